"""ODE solvers: convergence order on an ODE with a known solution, NFE accounting, time grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rfkit.solvers import RK4, Euler, Heun, Midpoint, time_grid


def velocity(x, t):
    """dx/dt = t x (non-autonomous, so a solver that mishandles t fails); x(1) = x(0) e^{1/2}."""
    return t.reshape(-1, 1) * x


X0 = torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
EXACT = X0 * math.exp(0.5)


@pytest.mark.parametrize("solver,order", [(Euler(), 1), (Midpoint(), 2), (Heun(), 2), (RK4(), 4)], ids=repr)
def test_convergence_order(solver, order):
    steps = [8, 16, 32, 64]
    errs = [float((solver(velocity, X0, time_grid(k, dtype=torch.float64)) - EXACT).abs().max()) for k in steps]
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert slope == pytest.approx(order, abs=0.15)


@pytest.mark.parametrize("solver", [Euler(), Midpoint(), Heun(), RK4()], ids=repr)
def test_straight_flow_is_exact_in_one_step(solver):
    # a constant field (a perfectly straight flow) is integrated exactly by any solver in one step
    c = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    x0 = torch.randn(2, 2)
    out = solver(lambda x, t: c, x0, time_grid(1))
    torch.testing.assert_close(out, x0 + c)


@pytest.mark.parametrize("solver,per_step", [(Euler(), 1), (Midpoint(), 2), (Heun(), 2), (RK4(), 4)], ids=repr)
def test_nfe_is_reported_and_true(solver, per_step):
    calls = []

    def counting(x, t):
        calls.append(t.clone())
        assert t.shape == (x.shape[0],)
        return velocity(x, t)

    solver(counting, X0, time_grid(5, dtype=torch.float64))
    assert len(calls) == solver.nfe(5) == 5 * per_step


def test_time_grid():
    g = time_grid(4)
    torch.testing.assert_close(g, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    a = 3.0
    s = torch.linspace(1, 0, 11, dtype=torch.float64)
    torch.testing.assert_close(time_grid(10, a, dtype=torch.float64), 1 - a * s / (1 + (a - 1) * s))
    d = torch.diff(time_grid(10, a))
    assert bool((d > 0).all()) and d[0] < d[-1]  # small steps near noise
    assert time_grid(3, device="cpu", dtype=torch.float64).dtype == torch.float64


def test_bad_input():
    with pytest.raises(ValueError, match="num_steps"):
        time_grid(0)
    with pytest.raises(ValueError, match="shift"):
        time_grid(4, shift=0.0)
    with pytest.raises(ValueError, match="x0"):
        Euler()(velocity, torch.tensor([[float("nan")]]), time_grid(2))
    with pytest.raises(ValueError, match="t_grid"):
        Euler()(velocity, X0, torch.tensor([0.0]))
