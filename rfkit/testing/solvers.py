"""ODE solvers: the rules every :class:`~rfkit.solvers.Solver` keeps, and :func:`check_solver`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rfkit.solvers import Solver, time_grid
from rfkit.testing.rules import Rule, gen, require, run_rules


def _solve(solver: Solver, field, x0: Tensor, t_grid: Tensor) -> tuple[Tensor, int]:
    """Integrate while checking every call's shapes; return the result and the number of calls."""
    calls = 0

    def v(x: Tensor, t: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        require(x.shape == x0.shape, solver, f"velocity_fn got x of shape {tuple(x.shape)}, not {tuple(x0.shape)}")
        require(t.shape == (x0.shape[0],), solver, f"velocity_fn got t of shape {tuple(t.shape)}, not (n,)")
        return field(x, t)

    return solver(v, x0, t_grid), calls


def is_a_solver(solver, ctx) -> None:
    """It subclasses :class:`rfkit.solvers.Solver`."""
    require(isinstance(solver, Solver), solver, "it must subclass rfkit.solvers.Solver")


def integrates_a_constant_field_exactly(solver, ctx) -> None:
    """On ``v = c`` it returns ``x0 + c (t_K - t_0)`` on a uniform and a shifted grid, with ``x0``'s
    shape and dtype, leaves ``x0`` alone, and calls the velocity with x (n, *shape) and t (n,),
    exactly ``solver.nfe(steps)`` times."""
    g = gen(0)
    x0 = torch.randn(5, 3, 2, generator=g, dtype=torch.float64)
    c = torch.randn(5, 3, 2, generator=g, dtype=torch.float64)
    for steps, shift in ((5, 1.0), (7, 3.0)):
        grid = time_grid(steps, shift, dtype=torch.float64)
        kept = x0.clone()
        x1, calls = _solve(solver, lambda x, t: c, x0, grid)
        require(torch.equal(x0, kept), solver, "x0 was modified in place")
        require(x1.shape == x0.shape and x1.dtype == x0.dtype, solver, "the result must have x0's shape and dtype")
        require(
            torch.allclose(x1, x0 + c, rtol=0, atol=1e-10),
            solver,
            f"a constant velocity must be integrated exactly ({steps} steps, shift {shift}); "
            f"max error {float((x1 - x0 - c).abs().max()):.3g}",
        )
        require(
            calls == solver.nfe(steps),
            solver,
            f"nfe({steps}) says {solver.nfe(steps)} velocity evaluations, but {calls} were made",
        )


def has_the_claimed_order(solver, ctx) -> None:
    """With ``order``: on ``dx/dt = -2 t x`` (solution ``x0 exp(-t^2)``) halving the step divides the
    error at t = 1 by about ``2^order`` (measured order >= order - 0.3, from 16 to 32 steps, float64)."""
    order = ctx["order"]
    if order is None:
        return
    x0 = torch.randn(5, 3, 2, generator=gen(0), dtype=torch.float64)
    errors = []
    for steps in (16, 32):
        x1, _ = _solve(solver, lambda x, t: -2.0 * t.reshape(-1, 1, 1) * x, x0, time_grid(steps, dtype=torch.float64))
        errors.append(float((x1 - x0 * math.exp(-1.0)).abs().max()))
    measured = math.log2(errors[0] / max(errors[1], 1e-300))
    require(
        measured >= order - 0.3,
        solver,
        f"claimed order {order}, measured {measured:.2f} (errors {errors[0]:.2e} at 16 steps, {errors[1]:.2e} at 32)",
    )


SOLVER_RULES: tuple[Rule, ...] = (is_a_solver, integrates_a_constant_field_exactly, has_the_claimed_order)


def check_solver(solver: Solver, *, order: int | None = None) -> None:
    """Check a :class:`~rfkit.solvers.Solver` against :data:`SOLVER_RULES`; ``order``: the claimed order
    of accuracy, if any."""
    run_rules(solver, SOLVER_RULES, {"order": order})
