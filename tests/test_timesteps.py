"""Timestep samplers: each against the paper's formula (two-sample KS), its own density, and its contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from rfkit.timesteps import (
    CosMap,
    LogitNormal,
    ModeSampler,
    ResolutionShifted,
    Shifted,
    TimestepSampler,
    Uniform,
    UShaped,
    resolution_shift,
)

N = 40_000


def draw(sampler: TimestepSampler, n: int = N, seed: int = 0) -> np.ndarray:
    return sampler(n, generator=torch.Generator().manual_seed(seed)).double().numpy()


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


# The papers' formulas, written independently in numpy, in the papers' sigma (= 1 - t).
def paper_logit_normal(rng, n, m, s):
    return 1.0 - sigmoid(m + s * rng.standard_normal(n))


def paper_mode(rng, n, s):
    u = rng.random(n)
    return 1.0 - (1.0 - u - s * (np.cos(np.pi / 2 * u) ** 2 - 1.0 + u))


def paper_cosmap(rng, n):
    u = rng.random(n)
    return 1.0 - (1.0 - 1.0 / (np.tan(np.pi / 2 * u) + 1.0))


def paper_u_shaped(rng, n, a):
    # rejection sampling from p(t) ∝ exp(a t) + exp(a (1 - t)); an algorithm unlike rfkit's inverse CDF
    out = []
    bound = 1.0 + math.exp(a)
    while sum(len(o) for o in out) < n:
        t = rng.random(4 * n)
        keep = rng.random(4 * n) * bound < np.exp(a * t) + np.exp(a * (1 - t))
        out.append(t[keep])
    return np.concatenate(out)[:n]


def paper_shift(t, a):
    sigma = 1.0 - t
    return 1.0 - a * sigma / (1.0 + (a - 1.0) * sigma)


CASES = [
    ("uniform", Uniform(), lambda rng: rng.random(N)),
    ("logitnormal", LogitNormal(0.5, 0.8), lambda rng: paper_logit_normal(rng, N, 0.5, 0.8)),
    ("logitnormal-neg", LogitNormal(-1.0, 1.5), lambda rng: paper_logit_normal(rng, N, -1.0, 1.5)),
    ("mode", ModeSampler(1.29), lambda rng: paper_mode(rng, N, 1.29)),
    ("mode-neg", ModeSampler(-0.8), lambda rng: paper_mode(rng, N, -0.8)),
    ("cosmap", CosMap(), lambda rng: paper_cosmap(rng, N)),
    ("ushaped", UShaped(4.0), lambda rng: paper_u_shaped(rng, N, 4.0)),
    ("shifted-uniform", Shifted(Uniform(), 3.0), lambda rng: paper_shift(rng.random(N), 3.0)),
    (
        "shifted-mode",
        Shifted(ModeSampler(1.0), 0.5),
        lambda rng: paper_shift(paper_mode(rng, N, 1.0), 0.5),
    ),
    (
        "resolution-1024",
        ResolutionShifted(LogitNormal(), num_tokens=1024),
        lambda rng: paper_shift(paper_logit_normal(rng, N, 0.0, 1.0), math.exp(0.5 + (1024 - 256) * 0.65 / 3840)),
    ),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("name,sampler,paper", CASES, ids=IDS)
def test_matches_paper_formula(name, sampler, paper):
    ours = draw(sampler)
    ref = paper(np.random.default_rng(1))
    assert stats.ks_2samp(ours, ref).pvalue > 0.01


@pytest.mark.parametrize("name,sampler,paper", CASES, ids=IDS)
def test_density_integrates_to_one(name, sampler, paper):
    def f(x):
        return float(sampler.density(torch.tensor([x], dtype=torch.float64)))

    total, _ = integrate.quad(f, 0.0, 1.0, limit=200)
    assert total == pytest.approx(1.0, abs=2e-4)


@pytest.mark.parametrize("name,sampler,paper", CASES, ids=IDS)
def test_density_agrees_with_samples(name, sampler, paper):
    # one-sample KS against the CDF obtained by integrating density() numerically
    grid = torch.linspace(1e-9, 1 - 1e-9, 200_001, dtype=torch.float64)
    pdf = sampler.density(grid).numpy()
    cdf = integrate.cumulative_trapezoid(pdf, grid.numpy(), initial=0.0)
    cdf /= cdf[-1]
    ours = draw(sampler, seed=7)
    assert stats.kstest(ours, lambda x: np.interp(x, grid.numpy(), cdf)).pvalue > 0.01


def test_a_wrong_formula_is_caught():
    # the tests above have power: LogitNormal with the diffusers sign flip fails the paper KS test
    flipped = draw(LogitNormal(-0.5, 0.8))
    ref = paper_logit_normal(np.random.default_rng(1), N, 0.5, 0.8)
    assert stats.ks_2samp(flipped, ref).pvalue < 1e-6


@pytest.mark.parametrize("name,sampler,paper", CASES, ids=IDS)
def test_contract(name, sampler, paper):
    t = sampler(1000, generator=torch.Generator().manual_seed(3))
    assert t.shape == (1000,) and t.dtype == torch.float32
    assert bool(((t > 0) & (t < 1)).all())
    again = sampler(1000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t, again)
    other = sampler(1000, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(t, other)
    assert sampler(5, device="cpu").device.type == "cpu"


def test_positive_loc_favours_noise():
    assert draw(LogitNormal(1.0, 1.0)).mean() < 0.35  # t = 0 is noise
    assert draw(LogitNormal(-1.0, 1.0)).mean() > 0.65


def test_extreme_logit_normal_stays_open():
    t = LogitNormal(loc=30.0, scale=1.0)(1000)
    assert bool(((t > 0) & (t < 1)).all())


def test_shifted_logit_normal_identity():
    m, s, a = 0.3, 0.9, 3.0
    shifted, direct = Shifted(LogitNormal(m, s), a), LogitNormal(m + math.log(a), s)
    grid = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    torch.testing.assert_close(shifted.density(grid), direct.density(grid), rtol=1e-10, atol=1e-12)
    # same draws from the same normal numbers, up to float32 rounding of the map
    g = torch.Generator().manual_seed(5)
    torch.testing.assert_close(shifted(4096, generator=g), direct(4096, generator=g.manual_seed(5)), atol=2e-6, rtol=0)


def test_shift_moves_toward_noise():
    base = draw(LogitNormal())
    assert draw(Shifted(LogitNormal(), 3.0)).mean() < base.mean() - 0.1
    assert draw(Shifted(LogitNormal(), 1.0)) == pytest.approx(base, abs=1e-6)


def test_mode_sampler_scale_bounds():
    ModeSampler(-1.0), ModeSampler(2.0 / (math.pi - 2.0))  # the closed interval is allowed
    for bad in (-1.01, 1.76, 5.0):
        with pytest.raises(ValueError, match="not monotone"):
            ModeSampler(bad)


def test_mode_zero_is_uniform():
    grid = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    torch.testing.assert_close(ModeSampler(0.0).density(grid), torch.ones_like(grid))


def test_cosmap_density_closed_form():
    # p(sigma) = 2 / (pi (1 - 2 sigma + 2 sigma^2)), symmetric, so the t-density has the same form
    t = torch.tensor([0.1, 0.5, 0.8], dtype=torch.float64)
    s = 1 - t
    torch.testing.assert_close(CosMap().density(t), 2 / (math.pi * (1 - 2 * s + 2 * s**2)))


def test_resolution_shift_is_flux():
    assert resolution_shift(256) == pytest.approx(math.exp(0.5))
    assert resolution_shift(4096) == pytest.approx(math.exp(1.15))
    assert resolution_shift(2176) == pytest.approx(math.exp(0.825))
    rs = ResolutionShifted(Uniform(), num_tokens=256)
    assert rs.shift == pytest.approx(math.exp(0.5))
    big = rs.for_tokens(4096)
    assert big.shift == pytest.approx(math.exp(1.15)) and rs.shift == pytest.approx(math.exp(0.5))
    assert rs.for_tokens(256) is rs
    nested = Shifted(ResolutionShifted(Uniform()), 2.0).for_tokens(4096)
    assert nested.base.shift == pytest.approx(math.exp(1.15))
    assert Uniform().for_tokens(999) is not None


@pytest.mark.parametrize(
    "make,arg",
    [
        (lambda: Uniform()(0), "n"),
        (lambda: Uniform()(-3), "n"),
        (lambda: Uniform()(2.5), "n"),
        (lambda: Shifted(Uniform(), 0.0), "shift"),
        (lambda: Shifted(Uniform(), -1.0), "shift"),
        (lambda: LogitNormal(0.0, 0.0), "scale"),
        (lambda: UShaped(0.0), "a"),
        (lambda: resolution_shift(0), "num_tokens"),
    ],
)
def test_bad_arguments_name_themselves(make, arg):
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        make()
