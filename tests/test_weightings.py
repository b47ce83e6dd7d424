"""Loss weightings: closed forms against the sources' formulas, and the sampling/weighting identity."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate

from rfkit.timesteps import CosMap, LogitNormal, ModeSampler, Shifted, Uniform, UShaped
from rfkit.weightings import Constant, CosMapWeight, DensityWeighting, MinSNR, SigmaSqrt

T = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
SIGMA = 1.0 - T  # diffusers / SD3 write their weightings in sigma


def test_constant():
    assert torch.equal(Constant(2.5)(T), torch.full_like(T, 2.5))
    with pytest.raises(ValueError, match="value"):
        Constant(-1.0)


def test_sigma_sqrt_is_diffusers_formula():
    # diffusers.training_utils.compute_loss_weighting_for_sd3("sigma_sqrt") == sigmas ** -2.0
    torch.testing.assert_close(SigmaSqrt()(T), SIGMA**-2.0)
    assert float(SigmaSqrt(max_weight=10.0)(T).max()) == 10.0
    with pytest.raises(ValueError, match="max_weight"):
        SigmaSqrt(max_weight=0.0)


def test_cosmap_weight_is_diffusers_formula():
    # diffusers: bot = 1 - 2 sigma + 2 sigma^2; weighting = 2 / (pi * bot)
    torch.testing.assert_close(CosMapWeight()(T), 2.0 / (math.pi * (1 - 2 * SIGMA + 2 * SIGMA**2)))
    torch.testing.assert_close(CosMapWeight()(T), CosMap().density(T))


def test_min_snr_closed_form():
    gamma = 5.0
    snr = (T / (1 - T)) ** 2
    w = MinSNR(gamma)(T)
    # Min-SNR on the data-prediction loss, x1_hat - x1 = (1 - t)(v - u)
    torch.testing.assert_close(w, torch.clamp(snr, max=gamma) * (1 - T) ** 2)
    # the same objective from the epsilon-prediction side, x0_hat - x0 = -t (v - u)
    torch.testing.assert_close(w, torch.clamp(snr, max=gamma) / snr * T**2)
    # below the cap it is exactly the data-prediction weight t^2; above, gamma (1 - t)^2
    t = torch.tensor([0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(MinSNR(gamma)(t), torch.tensor([0.25, gamma * 0.01], dtype=torch.float64))
    with pytest.raises(ValueError, match="gamma"):
        MinSNR(0.0)


def loss_curve(t: torch.Tensor) -> torch.Tensor:
    """A stand-in for a per-t loss with structure at both ends."""
    return (t - 0.3) ** 2 + torch.sin(3 * t) + 0.5 / (1 + 20 * t)


@pytest.mark.parametrize(
    "sampler",
    [LogitNormal(0.5, 1.0), ModeSampler(1.29), CosMap(), UShaped(4.0), Shifted(LogitNormal(), 3.0)],
    ids=repr,
)
def test_sampling_equals_weighting_by_monte_carlo(sampler):
    n = 400_000
    g = torch.Generator().manual_seed(0)
    drawn = loss_curve(sampler(n, generator=g).double())
    u = Uniform()(n, generator=g).double()
    weighted = DensityWeighting(sampler)(u) * loss_curve(u)
    se = math.sqrt(drawn.var() / n + weighted.var() / n)
    assert abs(float(drawn.mean() - weighted.mean())) < 4 * se
    # and both agree with the integral of p(t) L(t)
    exact, _ = integrate.quad(
        lambda x: float(sampler.density(torch.tensor([x], dtype=torch.float64)) * loss_curve(torch.tensor(x))),
        0,
        1,
        limit=200,
    )
    assert abs(float(drawn.mean()) - exact) < 4 * math.sqrt(drawn.var() / n)


def test_weightings_are_finite_and_non_negative():
    for w in (Constant(), SigmaSqrt(), CosMapWeight(), MinSNR(), DensityWeighting(ModeSampler())):
        out = w(T.float())
        assert out.shape == T.shape and out.dtype == torch.float32
        assert bool(torch.isfinite(out).all()) and bool((out >= 0).all())
