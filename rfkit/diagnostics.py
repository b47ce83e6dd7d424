"""How straight is a flow? Straightness and transport cost along generated trajectories.

For the ODE ``dZ_t/dt = v(Z_t, t)`` started at noise ``Z_0`` (Liu et al. 2022, "Flow Straight and Fast")::

    straightness   S = int_0^1 E || (Z_1 - Z_0) - dZ_t/dt ||^2 dt
    transport cost C = E || Z_1 - Z_0 ||^2

S = 0 exactly when every trajectory is a straight line travelled at constant speed, and then one
Euler step samples exactly. Minibatch OT and reflow lower both S and C (docs/design.md §2). Norms
are summed over the latent dimensions and averaged over samples.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from rfkit.solvers import VelocityFn, time_grid

__all__ = ["FlowStats", "flow_stats", "transport_cost"]


@dataclass
class FlowStats:
    """Trajectory statistics of a flow from fixed noise.

    Attributes:
        x1: (n, *shape) endpoints Z_1.
        straightness: S, discretised on the grid (see :func:`flow_stats`); clipped at 0 against
            rounding, since it is a mean of squares.
        transport_cost: C = mean ||Z_1 - Z_0||^2.
        nfe: velocity evaluations spent.
    """

    x1: Tensor
    straightness: float
    transport_cost: float
    nfe: int


def transport_cost(x0: Tensor, x1: Tensor) -> float:
    """``mean_i ||x1_i - x0_i||^2`` over a batch (n, *shape)."""
    return float((x1 - x0).flatten(1).double().pow(2).sum(1).mean())


@torch.no_grad()
def flow_stats(velocity_fn: VelocityFn, x0: Tensor, num_steps: int = 100) -> FlowStats:
    """Integrate with Euler on a uniform grid and measure the path on the way.

    With ``v_k = v(Z_{t_k}, t_k)`` and ``Z_{k+1} = Z_k + dt v_k`` the displacement is exactly
    ``D = Z_1 - Z_0 = sum_k dt v_k``, so the discretised straightness needs no stored velocities::

        S = sum_k dt E||D - v_k||^2 = sum_k dt E||v_k||^2 - E||D||^2

    (expand the square and use ``sum_k dt v_k = D``, ``sum_k dt = 1``). The Euler trajectory is the
    one a ``num_steps``-step sampler produces; with many steps it approaches the exact ODE solution.

    Args:
        velocity_fn: ``v(x, t)`` with t of shape (n,).
        x0: (n, *shape) starting noise.
        num_steps: Euler steps K.
    """
    grid = time_grid(num_steps, device=x0.device, dtype=x0.dtype)
    n, x, kinetic = x0.shape[0], x0, 0.0
    for t0, t1 in itertools.pairwise(grid):
        v = velocity_fn(x, t0.expand(n))
        kinetic += float(t1 - t0) * float(v.flatten(1).double().pow(2).sum(1).mean())
        x = x + (t1 - t0) * v
    cost = transport_cost(x0, x)
    return FlowStats(x1=x, straightness=max(kinetic - cost, 0.0), transport_cost=cost, nfe=num_steps)
