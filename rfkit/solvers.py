"""Fixed-grid ODE solvers for sampling: integrate ``dx/dt = v(x, t)`` from t = 0 (noise) to t = 1.

A straight flow is integrated exactly by one Euler step; the straighter the learned flow, the
fewer velocity evaluations (NFE) a sample costs. Each solver states its NFE per step in
``evals_per_step`` and :meth:`Solver.nfe` reports the total for a grid.

The time grid may carry the inference-side shift of SD3/Flux (:func:`time_grid`): the same map
``sigma' = a sigma / (1 + (a - 1) sigma)`` as training's :class:`rfkit.timesteps.Shifted`, which
puts more of the steps at high noise.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from rfkit.paths import expand_t
from rfkit.plugin import Plugin
from rfkit.timesteps import shift_sigma

__all__ = ["RK4", "Euler", "Heun", "Midpoint", "Solver", "VelocityFn", "time_grid"]

VelocityFn = Callable[[Tensor, Tensor], Tensor]
"""``v(x, t)``: x (n, *shape), t (n,) -> velocity (n, *shape)."""


def time_grid(
    num_steps: int, shift: float = 1.0, *, device: torch.device | str | None = None, dtype=torch.float32
) -> Tensor:
    """(num_steps + 1,) increasing times from 0 to 1.

    Uniform in sigma = 1 - t, then shifted: ``sigma' = a sigma / (1 + (a - 1) sigma)`` with
    ``a = shift``. ``a > 1`` takes smaller steps near t = 0 (noise), as SD3 (a = 3) and Flux
    (a = :func:`rfkit.timesteps.resolution_shift`) sample.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (1 means no shift), got {shift}")
    sigma = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (1.0 - shift_sigma(sigma, shift)).to(device=device, dtype=dtype)


class Solver(Plugin, ABC):
    """Integrates a velocity field along a time grid."""

    evals_per_step: int = 1

    @abstractmethod
    def step(self, v: VelocityFn, x: Tensor, t: Tensor, dt: Tensor) -> Tensor:
        """One step from ``t`` to ``t + dt``; ``x`` (n, *shape), ``t`` and ``dt`` (n,) -> (n, *shape)."""

    def __call__(self, velocity_fn: VelocityFn, x0: Tensor, t_grid: Tensor) -> Tensor:
        """Integrate from ``t_grid[0]`` to ``t_grid[-1]``.

        Args:
            velocity_fn: ``v(x, t)``, with t of shape (n,).
            x0: (n, *shape) start (noise when ``t_grid[0] = 0``).
            t_grid: (K + 1,) increasing times, e.g. from :func:`time_grid`.

        Returns:
            (n, *shape) the state at ``t_grid[-1]``, after :meth:`nfe` velocity evaluations.
        """
        if t_grid.ndim != 1 or t_grid.numel() < 2:
            raise ValueError(f"t_grid must be 1-D with >= 2 times, got shape {tuple(t_grid.shape)}")
        if not torch.isfinite(x0).all():
            raise ValueError("x0 contains NaN or inf")
        x = x0
        n = x0.shape[0]
        for t0, t1 in itertools.pairwise(t_grid):
            x = self.step(velocity_fn, x, t0.expand(n), (t1 - t0).expand(n))
        return x

    def nfe(self, num_steps: int) -> int:
        """Velocity evaluations spent on ``num_steps`` steps."""
        return self.evals_per_step * num_steps


class Euler(Solver):
    """``x' = x + dt v(x, t)``; first order, 1 NFE per step. Exact on straight paths."""

    evals_per_step = 1

    def step(self, v, x, t, dt):
        return x + expand_t(dt, x) * v(x, t)


class Midpoint(Solver):
    """Explicit midpoint: ``x' = x + dt v(x + dt/2 v(x, t), t + dt/2)``; second order, 2 NFE."""

    evals_per_step = 2

    def step(self, v, x, t, dt):
        half = 0.5 * dt
        return x + expand_t(dt, x) * v(x + expand_t(half, x) * v(x, t), t + half)


class Heun(Solver):
    """Heun (explicit trapezoid): average the slopes at both ends of an Euler step; second order, 2 NFE."""

    evals_per_step = 2

    def step(self, v, x, t, dt):
        k1 = v(x, t)
        k2 = v(x + expand_t(dt, x) * k1, t + dt)
        return x + expand_t(0.5 * dt, x) * (k1 + k2)


class RK4(Solver):
    """Classical fourth-order Runge-Kutta; 4 NFE per step."""

    evals_per_step = 4

    def step(self, v, x, t, dt):
        h, half = expand_t(dt, x), expand_t(0.5 * dt, x)
        k1 = v(x, t)
        k2 = v(x + half * k1, t + 0.5 * dt)
        k3 = v(x + half * k2, t + 0.5 * dt)
        k4 = v(x + h * k3, t + dt)
        return x + h / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
