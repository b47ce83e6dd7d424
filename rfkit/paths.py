"""The straight (rectified) probability path, for latents of any rank.

Convention (docs/design.md §1)::

    x_t = (1 - t) x0 + t x1        x0 ~ N(0, I) at t = 0, x1 ~ data at t = 1
    u   = x1 - x0                  the conditional target velocity

The regression ``E ||v(x_t, t) - u||^2`` has the marginal field ``E[x1 - x0 | x_t]`` as its
minimiser (Liu et al. 2022; Lipman et al. 2023). A velocity also gives the endpoints it predicts,
which is how guidance, x-prediction losses and one-step previews are written::

    x1_hat = x_t + (1 - t) v        x0_hat = x_t - t v
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["PathSample", "expand_t", "predict_x0", "predict_x1", "straight_path"]


@dataclass
class PathSample:
    """A point on the straight path and its target.

    Attributes:
        t: (n,) timesteps.
        x_t: (n, *shape) interpolant ``(1 - t) x0 + t x1``.
        u: (n, *shape) target velocity ``x1 - x0``.
    """

    t: Tensor
    x_t: Tensor
    u: Tensor


def expand_t(t: Tensor, like: Tensor) -> Tensor:
    """Reshape (n,) per-row values (timesteps, step sizes, masks) to (n, 1, ..., 1) in ``like``'s dtype,
    so they broadcast against ``like`` (n, *shape)."""
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must have shape (n,) with n = batch size {like.shape[0]}, got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def straight_path(x0: Tensor, x1: Tensor, t: Tensor) -> PathSample:
    """Sample the straight path at ``t``.

    Args:
        x0: (n, *shape) noise.
        x1: (n, *shape) data, same shape as ``x0``.
        t: (n,) timesteps in [0, 1].

    Returns:
        :class:`PathSample` with ``x_t = x0 + t (x1 - x0)`` and ``u = x1 - x0``.
    """
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    u = x1 - x0
    return PathSample(t=t, x_t=x0 + expand_t(t, x0) * u, u=u)


def predict_x1(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """Data the velocity points to: ``x1_hat = x_t + (1 - t) v``. Shapes as ``x_t``."""
    return x_t + (1.0 - expand_t(t, x_t)) * v


def predict_x0(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """Noise the velocity came from: ``x0_hat = x_t - t v``. Shapes as ``x_t``."""
    return x_t - expand_t(t, x_t) * v
