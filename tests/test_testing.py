"""rfkit.testing: every built-in passes its axis's contract check, and broken plugins are caught."""

from __future__ import annotations

import pytest
import torch

from rfkit.couplings import Coupling, Independent, MinibatchOT, Reflow, check_pair
from rfkit.solvers import RK4, Euler, Heun, Midpoint
from rfkit.testing import (
    COUPLING_RULES,
    SAMPLER_RULES,
    SOLVER_RULES,
    WEIGHTING_RULES,
    check_coupling,
    check_sampler,
    check_solver,
    check_weighting,
)
from rfkit.timesteps import (
    CosMap,
    LogitNormal,
    ModeSampler,
    ResolutionShifted,
    Shifted,
    Uniform,
    UShaped,
)
from rfkit.weightings import Constant, CosMapWeight, DensityWeighting, LossWeighting, MinSNR, SigmaSqrt

# ---------------------------------------------------------------------------- the built-ins pass

SAMPLERS = [
    Uniform(),
    LogitNormal(),
    LogitNormal(1.5, 0.5),
    ModeSampler(1.29),
    CosMap(),
    UShaped(4.0),
    Shifted(LogitNormal(), 3.0),
    ResolutionShifted(Uniform(), num_tokens=4096),
]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=repr)
def test_builtin_samplers_keep_the_contract(sampler):
    check_sampler(sampler)


@pytest.mark.parametrize("shape", [(16, 2), (12, 3, 4, 4)])
@pytest.mark.parametrize(
    "coupling,kw",
    [
        (Independent(), {"permutation": True}),
        (MinibatchOT("exact"), {"permutation": True}),
        (MinibatchOT("exact", chunk_size=5), {"permutation": True}),  # blocks of 5, a shorter last one
        (MinibatchOT("sinkhorn"), {}),  # draws from the plan: rows of x0, with repeats
        (Reflow(), {"rows_of": "noise", "permutation": True}),
    ],
    ids=repr,
)
def test_builtin_couplings_keep_the_contract(coupling, kw, shape):
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(shape, generator=g), torch.randn(shape, generator=g) + 2.0
    check_coupling(coupling, x0, x1, cond={"cls": torch.arange(shape[0]) % 3}, **kw)


@pytest.mark.parametrize(
    "weighting",
    [
        Constant(),
        SigmaSqrt(),
        SigmaSqrt(max_weight=100.0),
        CosMapWeight(),
        MinSNR(5.0),
        DensityWeighting(ModeSampler()),
    ],
    ids=repr,
)
def test_builtin_weightings_keep_the_contract(weighting):
    check_weighting(weighting)


@pytest.mark.parametrize("solver,order", [(Euler(), 1), (Midpoint(), 2), (Heun(), 2), (RK4(), 4)], ids=repr)
def test_builtin_solvers_keep_the_contract(solver, order):
    check_solver(solver, order=order)


# ---------------------------------------------------------------------------- broken samplers


class IgnoresGenerator(Uniform):
    def __call__(self, n, *, device=None, generator=None):
        return torch.rand(n, device=device).clamp(1e-6, 1 - 1e-6)  # torch's global RNG


class ReachesZero(Uniform):
    def __call__(self, n, *, device=None, generator=None):
        t = super().__call__(n, device=device, generator=generator)
        return torch.where(t < 0.01, torch.zeros_like(t), t)


class WrongDensity(Uniform):
    """Draws t = sqrt(u) (density 2t) but reports the uniform density."""

    def __call__(self, n, *, device=None, generator=None):
        return super().__call__(n, device=device, generator=generator).sqrt()


class Unnormalised(Uniform):
    def density(self, t):
        return 2.0 * torch.ones_like(t)


class Float64Draws(Uniform):
    def __call__(self, n, *, device=None, generator=None):
        return super().__call__(n, device=device, generator=generator).double()


class ColumnDraws(Uniform):
    def __call__(self, n, *, device=None, generator=None):
        return super().__call__(n, device=device, generator=generator)[:, None]


@pytest.mark.parametrize(
    "broken,rule",
    [
        (IgnoresGenerator(), "global RNG"),
        (ReachesZero(), r"open interval \(0, 1\); \d+ of 20000 do not"),
        (WrongDensity(), "do not follow density"),
        (Unnormalised(), "integrate to 1 .* got 2.0"),
        (Float64Draws(), "must be float32"),
        (ColumnDraws(), r"shape \(20000,\), got \(20000, 1\)"),
        (Independent(), "must subclass rfkit.timesteps.TimestepSampler"),
    ],
    ids=lambda x: type(x).__name__ if not isinstance(x, str) else "",
)
def test_broken_samplers_are_caught(broken, rule):
    with pytest.raises(AssertionError, match=rule):
        check_sampler(broken)


def test_a_slightly_wrong_density_is_caught():
    # power: LogitNormal's draws against a density whose scale is off by 5%
    class Off(LogitNormal):
        def density(self, t):
            return LogitNormal(self.loc, self.scale * 1.05).density(t)

    check_sampler(LogitNormal())
    with pytest.raises(AssertionError, match="do not follow density"):
        check_sampler(Off())


# ---------------------------------------------------------------------------- broken couplings


class MovesX1(Coupling):
    """Sorts both sides by their first coordinate: the labels of x1 no longer match it."""

    def __call__(self, x0, x1, *, noise=None, generator=None, cond=None):
        check_pair(x0, x1)
        return x0[x0[:, 0].argsort()], x1[x1[:, 0].argsort()]


class InPlace(Coupling):
    def __call__(self, x0, x1, *, noise=None, generator=None, cond=None):
        check_pair(x0, x1)
        x0.copy_(x0.flip(0))
        return x0, x1


class OldSignature(Coupling):
    def __call__(self, x0, x1, *, noise=None, generator=None):
        check_pair(x0, x1)
        return x0, x1


class RepeatsRows(Coupling):
    def __call__(self, x0, x1, *, noise=None, generator=None, cond=None):
        check_pair(x0, x1)
        return x0[torch.zeros(len(x0), dtype=torch.long)], x1


class NoValidation(Coupling):
    def __call__(self, x0, x1, *, noise=None, generator=None, cond=None):
        return x0[: len(x1)], x1


class FreshNoise(Coupling):
    def __call__(self, x0, x1, *, noise=None, generator=None, cond=None):
        check_pair(x0, x1)
        return torch.randn(x1.shape, generator=generator), x1


class UnseededShuffle(Coupling):
    def __call__(self, x0, x1, *, noise=None, generator=None, cond=None):
        check_pair(x0, x1)
        return x0[torch.randperm(len(x0))], x1  # ignores `generator`


class HalfPrecision(Coupling):
    def __call__(self, x0, x1, *, noise=None, generator=None, cond=None):
        check_pair(x0, x1)
        return x0.half(), x1


@pytest.mark.parametrize(
    "broken,kw,rule",
    [
        (MovesX1(), {}, "x1 must come back untouched"),
        (InPlace(), {}, "x0 was modified in place"),
        (OldSignature(), {}, "must accept the keyword `cond`"),
        (RepeatsRows(), {"permutation": True}, r"permutation of x0 .* 15 rows repeat"),
        (NoValidation(), {}, "x1 with 17 rows against 16 noise rows must raise ValueError"),
        (FreshNoise(), {}, "every row of x0' must be a row of x0"),
        (UnseededShuffle(), {}, "global RNG"),
        (HalfPrecision(), {}, "x0' must have x1's dtype"),
        (Reflow(), {"rows_of": "x0"}, "every row of x0' must be a row of x0"),
    ],
    ids=lambda x: type(x).__name__ if isinstance(x, Coupling) else "",
)
def test_broken_couplings_are_caught(broken, kw, rule):
    x0, x1 = torch.randn(16, 3), torch.randn(16, 3)
    noise = torch.randn(16, 3) if isinstance(broken, Reflow) else None
    with pytest.raises(AssertionError, match=rule):
        check_coupling(broken, x0, x1, noise=noise, **kw)


# ---------------------------------------------------------------------------- broken weightings and solvers


class Negative(LossWeighting):
    def __call__(self, t):
        return 1.0 - 2.0 * t


class NaNBelowHalf(LossWeighting):
    def __call__(self, t):
        return torch.log(t - 0.5).clamp(min=0)  # NaN survives clamp


class BatchNormalised(LossWeighting):
    def __call__(self, t):
        w = MinSNR()(t)
        return w / w.mean()


class AlwaysFloat32(LossWeighting):
    def __call__(self, t):
        return torch.ones(t.shape)


@pytest.mark.parametrize(
    "broken,rule",
    [
        (Negative(), "must be >= 0"),
        (NaNBelowHalf(), "must be finite; not at t"),
        (BatchNormalised(), "each sample's t alone"),
        (AlwaysFloat32(), "must have t's dtype torch.float64"),
        (Uniform(), "must subclass rfkit.weightings.LossWeighting"),
    ],
    ids=lambda x: type(x).__name__ if not isinstance(x, str) else "",
)
def test_broken_weightings_are_caught(broken, rule):
    with pytest.raises(AssertionError, match=rule):
        check_weighting(broken)


class UndercountedHeun(Heun):
    evals_per_step = 1


class ShortEuler(Euler):
    def step(self, v, x, t, dt):
        return super().step(v, x, t, 0.99 * dt)


class InPlaceEuler(Euler):
    def step(self, v, x, t, dt):
        return x.add_(dt.reshape(-1, *[1] * (x.ndim - 1)) * v(x, t))


@pytest.mark.parametrize(
    "broken,order,rule",
    [
        (UndercountedHeun(), None, r"nfe\(5\) says 5 velocity evaluations, but 10 were made"),
        (ShortEuler(), None, "constant velocity must be integrated exactly"),
        (InPlaceEuler(), None, "x0 was modified in place"),
        (Euler(), 2, "claimed order 2, measured 1.0"),
    ],
    ids=["nfe", "inexact", "in-place", "order"],
)
def test_broken_solvers_are_caught(broken, order, rule):
    with pytest.raises(AssertionError, match=rule):
        check_solver(broken, order=order)


def test_failures_are_plain_assertion_errors_naming_the_plugin():
    with pytest.raises(AssertionError) as err:
        check_sampler(WrongDensity())
    assert type(err.value) is AssertionError
    assert str(err.value).startswith("WrongDensity() breaks the rule 'draws_follow_the_density': the draws do not")


@pytest.mark.parametrize(
    "check,broken,rule",
    [
        (check_sampler, IgnoresGenerator(), "draws_only_from_its_generator"),
        (check_sampler, Unnormalised(), "density_is_a_density"),
        (check_coupling, InPlace(), "inputs_are_not_modified"),
        (check_coupling, NoValidation(), "bad_batches_raise_value_error"),
        (check_weighting, BatchNormalised(), "weights_depend_on_each_t_alone"),
        (check_solver, UndercountedHeun(), "integrates_a_constant_field_exactly"),
    ],
    ids=["sampler-rng", "sampler-density", "coupling-in-place", "coupling-validation", "weighting", "solver"],
)
def test_a_failure_names_its_rule_and_the_rule_is_listed(check, broken, rule):
    with pytest.raises(AssertionError, match=rf"breaks the rule '{rule}': "):
        check(broken)
    axis_rules = {
        check_sampler: SAMPLER_RULES,
        check_coupling: COUPLING_RULES,
        check_weighting: WEIGHTING_RULES,
        check_solver: SOLVER_RULES,
    }[check]
    assert rule in [r.__name__ for r in axis_rules]
    assert all(r.__doc__ for r in axis_rules)  # each rule states itself
