"""Timestep samplers: the rules every :class:`~rfkit.timesteps.TimestepSampler` keeps, and
:func:`check_sampler`, which runs them."""

from __future__ import annotations

import numpy as np
import torch
from scipy import integrate, stats
from torch import Tensor

from rfkit.testing.rules import Rule, gen, require, rng_untouched, run_rules
from rfkit.timesteps import TimestepSampler


def is_a_sampler(sampler, ctx) -> None:
    """It subclasses :class:`rfkit.timesteps.TimestepSampler`."""
    require(isinstance(sampler, TimestepSampler), sampler, "it must subclass rfkit.timesteps.TimestepSampler")


def draws_only_from_its_generator(sampler, ctx) -> None:
    """Given a generator, it leaves torch's global RNG alone (runs then reproduce)."""
    ctx["t"] = rng_untouched(sampler, lambda: sampler(ctx["n"], generator=gen(ctx["seed"])))


def draws_are_float32_in_the_open_interval(sampler, ctx) -> None:
    """``sampler(n)`` is a (n,) float32 tensor inside (0, 1)."""
    t, n = ctx["t"], ctx["n"]
    require(isinstance(t, Tensor), sampler, f"__call__ must return a torch.Tensor, got {type(t).__name__}")
    require(t.shape == (n,), sampler, f"__call__(n={n}) must return shape ({n},), got {tuple(t.shape)}")
    require(t.dtype == torch.float32, sampler, f"draws must be float32, got {t.dtype}")
    inside = (t > 0) & (t < 1)
    require(
        bool(inside.all()),
        sampler,
        f"draws must lie in the open interval (0, 1); {int((~inside).sum())} of {n} do not "
        f"(min {float(t.min())}, max {float(t.max())}); clamp them by one float32 ulp",
    )


def the_generator_decides_the_draws(sampler, ctx) -> None:
    """The same generator seed gives the same draws whatever torch's global seed; another seed, others."""
    seed = ctx["seed"]
    torch.manual_seed(1)
    a = sampler(256, generator=gen(seed + 1))
    torch.manual_seed(2)
    b = sampler(256, generator=gen(seed + 1))
    require(torch.equal(a, b), sampler, "the same generator seed must give the same draws")
    c = sampler(256, generator=gen(seed + 2))
    require(not torch.equal(a, c), sampler, "different generator seeds must give different draws")


def honours_device_and_resolution(sampler, ctx) -> None:
    """``sampler(1, device="cpu")`` is (1,) on the CPU; ``for_tokens`` returns a sampler."""
    small = sampler(1, device="cpu")
    require(small.shape == (1,) and small.device.type == "cpu", sampler, "n=1 on device='cpu' must give (1,) on cpu")
    require(isinstance(sampler.for_tokens(256), TimestepSampler), sampler, "for_tokens must return a sampler")


def density_is_a_density(sampler, ctx) -> None:
    """``density`` is finite, non-negative and integrates to 1 over (0, 1) (integrated over
    ``z = logit(t)`` in [-36, 36], ``dt = t (1 - t) dz``, which resolves densities that blow up at
    either end; sigmoid(36) still rounds below 1 in float64)."""
    z = torch.linspace(-36.0, 36.0, 200_001, dtype=torch.float64)
    grid = torch.sigmoid(z)
    p = sampler.density(grid.clone())
    require(isinstance(p, Tensor) and p.shape == grid.shape, sampler, "density(t) must return a tensor shaped like t")
    p = p.double().numpy()
    require(bool(np.isfinite(p).all()), sampler, "density must be finite inside (0, 1)")
    require(bool((p >= 0).all()), sampler, f"density must be >= 0, got min {p.min():.3g}")
    cdf = integrate.cumulative_trapezoid(p * (grid * (1 - grid)).numpy(), z.numpy(), initial=0.0)
    mass = float(cdf[-1])
    require(abs(mass - 1.0) < 1e-3, sampler, f"density must integrate to 1 over (0, 1), got {mass:.6f}")
    ctx["z"], ctx["cdf"] = z.numpy(), cdf / mass


def draws_follow_the_density(sampler, ctx) -> None:
    """A one-sample KS test of the ``n`` draws against the CDF of ``density`` does not reject at ``alpha``."""
    n, alpha = ctx["n"], ctx["alpha"]
    drawn = torch.logit(ctx["t"].double()).numpy()
    p_value = stats.kstest(drawn, lambda x: np.interp(x, ctx["z"], ctx["cdf"])).pvalue
    require(
        p_value > alpha,
        sampler,
        f"the draws do not follow density(): KS test of {n} draws against its CDF, p = {p_value:.2e} < {alpha}",
    )


SAMPLER_RULES: tuple[Rule, ...] = (
    is_a_sampler,
    draws_only_from_its_generator,
    draws_are_float32_in_the_open_interval,
    the_generator_decides_the_draws,
    honours_device_and_resolution,
    density_is_a_density,
    draws_follow_the_density,
)


def check_sampler(sampler: TimestepSampler, *, n: int = 20_000, seed: int = 0, alpha: float = 1e-3) -> None:
    """Check a :class:`~rfkit.timesteps.TimestepSampler` against :data:`SAMPLER_RULES`.

    Args:
        sampler: the plugin.
        n: draws for the range and KS rules.
        seed: the generator seed of those draws.
        alpha: the KS test's level.
    """
    run_rules(sampler, SAMPLER_RULES, {"n": n, "seed": seed, "alpha": alpha})
