"""The example plugins' own tests, as a plugin author writes them: rfkit's contract checks, then the math."""

from __future__ import annotations

import math

import numpy as np
import ot  # POT: an independent exact OT solver
import pytest
import torch
from rfkit_example_plugins import RK3, Beta, P2Weight, WithinClassOT
from scipy import stats

from rfkit.couplings import MinibatchOT
from rfkit.solvers import time_grid
from rfkit.testing import check_coupling, check_sampler, check_solver, check_weighting

# ---------------------------------------------------------------------------- contracts


@pytest.mark.parametrize("a,b", [(2.0, 2.0), (1.0, 1.5), (0.5, 0.7), (5.0, 1.2)])
def test_beta_keeps_the_sampler_contract(a, b):
    check_sampler(Beta(a, b))


def test_p2_keeps_the_weighting_contract():
    check_weighting(P2Weight())
    check_weighting(P2Weight(gamma=0.5, k=0.2))


def test_rk3_keeps_the_solver_contract():
    check_solver(RK3(), order=3)


@pytest.mark.parametrize("shape", [(24, 2), (18, 1, 4, 4)])
def test_within_class_ot_keeps_the_coupling_contract(shape):
    x0, x1, labels = torch.randn(shape), torch.randn(shape), torch.arange(shape[0]) % 4
    check_coupling(WithinClassOT(), x0, x1, cond={"cls": labels}, permutation=True)


# ---------------------------------------------------------------------------- Beta


@pytest.mark.parametrize("a,b", [(2.0, 5.0), (0.5, 0.5), (1.0, 1.5)])
def test_beta_matches_scipy(a, b):
    t = Beta(a, b)(40_000, generator=torch.Generator().manual_seed(0)).double().numpy()
    assert stats.kstest(t, stats.beta(a, b).cdf).pvalue > 0.01
    grid = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    np.testing.assert_allclose(Beta(a, b).density(grid).numpy(), stats.beta(a, b).pdf(grid.numpy()), rtol=1e-10)


def test_beta_one_one_is_uniform_and_mean_is_a_over_a_plus_b():
    grid = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    torch.testing.assert_close(Beta(1.0, 1.0).density(grid), torch.ones_like(grid))
    t = Beta(1.0, 3.0)(100_000, generator=torch.Generator().manual_seed(1))
    assert float(t.mean()) == pytest.approx(0.25, abs=0.005)  # more training near noise (t = 0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_beta_refuses_bad_shapes(bad):
    with pytest.raises(ValueError, match=r"\ba must be a finite number > 0"):
        Beta(bad, 1.0)
    with pytest.raises(ValueError, match=r"\bb must be"):
        Beta(1.0, bad)


# ---------------------------------------------------------------------------- P2


def test_p2_closed_form():
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    snr = (t / (1 - t)) ** 2
    # P2 weights the noise-prediction loss, and that loss is t^2 times the velocity loss
    torch.testing.assert_close(P2Weight(gamma=1.0, k=1.0)(t), t**2 / (1 + snr))
    torch.testing.assert_close(P2Weight(gamma=0.0)(t), t**2)
    with pytest.raises(ValueError, match="gamma"):
        P2Weight(gamma=-0.1)
    with pytest.raises(ValueError, match=r"\bk\b"):
        P2Weight(k=0.0)


def test_p2_weights_the_noise_loss_identity():
    # x0_hat = x_t - t v: its error is -t (v - u), so w * ||v - u||^2 = (k + SNR)^-gamma ||x0_hat - x0||^2
    g = torch.Generator().manual_seed(0)
    x0, x1, v = (torch.randn(8, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.rand(8, generator=g, dtype=torch.float64)
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1
    velocity_loss = ((v - (x1 - x0)) ** 2).sum(1)
    noise_loss = ((xt - t[:, None] * v - x0) ** 2).sum(1)
    snr = (t / (1 - t)) ** 2
    torch.testing.assert_close(P2Weight(0.5, 0.3)(t) * velocity_loss, (0.3 + snr) ** -0.5 * noise_loss)


# ---------------------------------------------------------------------------- WithinClassOT


def cost(x0, x1) -> float:
    return float(((x0 - x1) ** 2).flatten(1).sum())


def test_within_class_ot_is_exact_ot_of_each_class():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(60, 3, generator=g, dtype=torch.float64)
    x1 = torch.randn(60, 3, generator=g, dtype=torch.float64) + 1.0
    labels = torch.randint(0, 4, (60,), generator=g)
    y0, y1 = WithinClassOT()(x0, x1, cond={"cls": labels})
    assert y1 is x1
    for c in range(4):
        rows = labels == c
        # the noise of class c's positions stays with class c ...
        assert sorted(map(tuple, y0[rows].tolist())) == sorted(map(tuple, x0[rows].tolist()))
        # ... and is paired optimally, as an independent solver finds
        a, b = x0[rows].numpy(), x1[rows].numpy()
        n = len(a)
        best = ot.emd2(np.full(n, 1 / n), np.full(n, 1 / n), ot.dist(a, b)) * n
        assert cost(y0[rows], x1[rows]) == pytest.approx(best, rel=1e-9)
    # a constraint costs something: global OT is cheaper, independent pairing dearer
    assert cost(MinibatchOT()(x0, x1)[0], x1) < cost(y0, x1) < cost(x0, x1)


def test_within_class_ot_with_one_class_is_minibatch_ot():
    x0, x1 = torch.randn(32, 4), torch.randn(32, 4)
    y0, _ = WithinClassOT()(x0, x1, cond={"cls": torch.zeros(32, dtype=torch.long)})
    assert torch.equal(y0, MinibatchOT()(x0, x1)[0])


def test_within_class_ot_keeps_each_class_noise_gaussian():
    # global OT hands each class the noise nearest its data; within-class OT keeps p(x0 | c) = N(0, I)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(512) % 2
    x1 = torch.where(labels[:, None] == 0, -4.0, 4.0) + 0.1 * torch.randn(512, 2, generator=g)
    x0 = torch.randn(512, 2, generator=g)
    mine, _ = WithinClassOT()(x0, x1, cond={"cls": labels})
    glob, _ = MinibatchOT()(x0, x1)
    assert abs(float(mine[labels == 1, 0].mean())) < 0.2  # N(0, 1) mean, 256 samples: sd 0.06
    assert float(glob[labels == 1, 0].mean()) > 0.4  # global OT: class 1 gets the right-hand noise


def test_within_class_ot_needs_labels():
    x = torch.randn(8, 2)
    for cond in (None, {}, {"text": torch.randn(8, 3, 4)}):
        with pytest.raises(ValueError, match=r"no cond\['cls'\].*MinibatchOT"):
            WithinClassOT()(x, x.clone(), cond=cond)
    with pytest.raises(ValueError, match=r"one label per sample, shape \(8,\), got \(7,\)"):
        WithinClassOT()(x, x.clone(), cond={"cls": torch.zeros(7, dtype=torch.long)})


# ---------------------------------------------------------------------------- RK3


def test_rk3_is_simpsons_rule_on_time_only_fields():
    # for v = v(t), one RK3 step is Simpson's rule: exact for cubics in t
    x0 = torch.zeros(3, 1, dtype=torch.float64)
    x1 = RK3()(lambda x, t: (4 * t**3 - 3 * t**2 + 1.0)[:, None].expand_as(x), x0, time_grid(1, dtype=torch.float64))
    torch.testing.assert_close(x1, torch.ones_like(x0))  # integral of 4t^3 - 3t^2 + 1 over [0, 1] = 1
    assert RK3().nfe(10) == 30


def test_rk3_on_a_linear_ode_is_the_cubic_taylor_polynomial():
    # on dx/dt = x every 3-stage third-order Runge-Kutta step multiplies x by 1 + h + h^2/2 + h^3/6
    x0 = torch.ones(1, 1, dtype=torch.float64)
    x1 = RK3()(lambda x, t: x, x0, time_grid(10, dtype=torch.float64))
    h = 0.1
    assert float(x1) == pytest.approx((1 + h + h**2 / 2 + h**3 / 6) ** 10, rel=1e-12)
    assert abs(float(x1) - math.e) < 2e-4
