"""An ODE solver rfkit does not ship: Kutta's third-order Runge-Kutta method."""

from __future__ import annotations

from torch import Tensor

from rfkit.solvers import Solver, VelocityFn


def _col(s: Tensor, x: Tensor) -> Tensor:
    """(n,) -> (n, 1, ..., 1) in x's dtype, to scale each sample's state."""
    return s.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class RK3(Solver):
    """Kutta's third-order method: 3 NFE per step, between Heun (2, order 2) and RK4 (4, order 4)::

    k1 = v(x, t)
    k2 = v(x + h/2 k1, t + h/2)
    k3 = v(x - h k1 + 2 h k2, t + h)
    x' = x + h/6 (k1 + 4 k2 + k3)
    """

    evals_per_step = 3

    def step(self, v: VelocityFn, x: Tensor, t: Tensor, dt: Tensor) -> Tensor:
        h = _col(dt, x)
        k1 = v(x, t)
        k2 = v(x + 0.5 * h * k1, t + 0.5 * dt)
        k3 = v(x - h * k1 + 2.0 * h * k2, t + dt)
        return x + h / 6.0 * (k1 + 4.0 * k2 + k3)
