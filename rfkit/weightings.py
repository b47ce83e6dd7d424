"""Loss weightings: a per-sample factor ``w(t)`` on the velocity loss ``||v(x_t, t) - (x1 - x0)||^2``.

Convention (docs/design.md §1): ``t = 0`` is noise, ``t = 1`` is data, ``sigma = 1 - t``. Formulas from
SD3 and diffusers are written in sigma there; here each is restated in t.

Weighting and timestep sampling are two views of one objective: for any sampler with density
``p(t)``::

    E_{t ~ p}[ L(t) ] = E_{t ~ U(0, 1)}[ p(t) L(t) ]

:class:`DensityWeighting` is the right-hand side.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from rfkit.plugin import Plugin
from rfkit.timesteps import CosMap, TimestepSampler

__all__ = ["Constant", "CosMapWeight", "DensityWeighting", "LossWeighting", "MinSNR", "SigmaSqrt"]


class LossWeighting(Plugin, ABC):
    """Maps timesteps to per-sample loss weights."""

    @abstractmethod
    def __call__(self, t: Tensor) -> Tensor:
        """Weights for timesteps ``t``.

        Args:
            t: (n,) timesteps in (0, 1).

        Returns:
            (n,) non-negative weights, same dtype and device as ``t``.
        """


class Constant(LossWeighting):
    """``w(t) = value``: the plain rectified-flow loss (Liu et al. 2022)."""

    def __init__(self, value: float = 1.0) -> None:
        if not value >= 0:
            raise ValueError(f"value must be >= 0, got {value}")
        self.value = float(value)

    def __call__(self, t: Tensor) -> Tensor:
        return torch.full_like(t, self.value)


class SigmaSqrt(LossWeighting):
    """diffusers' ``weighting_scheme="sigma_sqrt"``: ``w = sigma^-2 = 1 / (1 - t)^2``.

    Despite the name, diffusers (``compute_loss_weighting_for_sd3``) returns ``sigma ** -2.0``, which
    turns the velocity loss into a data-prediction loss: ``x1_hat - x1 = sigma (v - u)``. rfkit
    keeps diffusers' formula so recipes port unchanged. It grows without bound as t -> 1;
    ``max_weight`` caps it (None: no cap, exactly as diffusers).
    """

    def __init__(self, max_weight: float | None = None) -> None:
        if max_weight is not None and not max_weight > 0:
            raise ValueError(f"max_weight must be > 0 or None, got {max_weight}")
        self.max_weight = max_weight

    def __call__(self, t: Tensor) -> Tensor:
        w = (1.0 - t) ** -2.0
        return w if self.max_weight is None else w.clamp(max=self.max_weight)


class CosMapWeight(LossWeighting):
    """diffusers' ``weighting_scheme="cosmap"``: ``w = 2 / (pi (1 - 2 sigma + 2 sigma^2))``.

    The CosMap density of SD3 §3.1 used as a weight; symmetric in sigma <-> t, so in t it reads
    ``2 / (pi (1 - 2 t + 2 t^2))``: ``DensityWeighting(CosMap())`` under diffusers' name, and
    equivalent in expectation to sampling t from :class:`rfkit.timesteps.CosMap`.
    """

    def __call__(self, t: Tensor) -> Tensor:
        return _COSMAP.density(t)


_COSMAP = CosMap()


class MinSNR(LossWeighting):
    """Min-SNR-gamma (Hang et al. 2023) restated for the velocity loss of a straight path.

    Min-SNR weights the data-prediction loss by ``min(SNR, gamma)``. On ``x_t = (1 - t) x0 + t x1``
    the signal-to-noise ratio is ``SNR = t^2 / (1 - t)^2`` and the data error is
    ``x1_hat - x1 = (1 - t)(v - u)``, so the same objective on the velocity loss is::

        w(t) = min(SNR, gamma) (1 - t)^2 = min(t^2, gamma (1 - t)^2)

    (equally: the epsilon-prediction weight ``min(SNR, gamma) / SNR`` times ``t^2``, since
    ``x0_hat - x0 = -t (v - u)``). It caps the weight of nearly clean timesteps, where the
    data-prediction loss is easy and would dominate. The paper uses ``gamma = 5``.
    """

    def __init__(self, gamma: float = 5.0) -> None:
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0 (the SNR cap), got {gamma}")
        self.gamma = float(gamma)

    def __call__(self, t: Tensor) -> Tensor:
        return torch.minimum(t**2, self.gamma * (1.0 - t) ** 2)


class DensityWeighting(LossWeighting):
    """``w(t) = p(t)`` for a sampler's density: pair it with :class:`~rfkit.timesteps.Uniform` t.

    ``E_{t ~ U}[p(t) L(t)] = E_{t ~ p}[L(t)]``: the same objective as drawing t from ``sampler``,
    with a different variance (docs/design.md §2). Useful to compare the two views, or to keep uniform
    t (e.g. for per-t loss curves) while training with a paper's density.
    """

    def __init__(self, sampler: TimestepSampler) -> None:
        self.sampler = sampler

    def __call__(self, t: Tensor) -> Tensor:
        return self.sampler.density(t)
