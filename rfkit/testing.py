"""Contract checks for plugins: call them from your own tests, one per axis.

Each check runs the named rules every implementation of an axis must keep (docs/design.md §3), in
order, and raises ``AssertionError`` naming the plugin, the rule it broke and what was seen, so it
works with plain ``assert``-style test runners and with pytest alike::

    from rfkit.testing import check_coupling, check_objective, check_sampler

    def test_my_sampler():
        check_sampler(MySampler(k=3))

    def test_my_coupling():
        check_coupling(MyCoupling(), permutation=True)

The rules of each axis are listed in ``SAMPLER_RULES``, ``COUPLING_RULES``, ``WEIGHTING_RULES`` and
``SOLVER_RULES`` (each rule a function whose name is the rule's name and whose docstring states it).
rfkit's own built-ins pass through the same checks in its test suite. The statistical checks use
fixed seeds, so a given plugin passes or fails deterministically; a correct sampler fails the KS
test at one seed in a thousand (``alpha``), and ``seed`` picks another draw.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from scipy import integrate, stats
from torch import Tensor

from rfkit.couplings import Coupling, MinibatchOT
from rfkit.draws import RowDraws
from rfkit.models import MLP
from rfkit.objectives import Objective
from rfkit.solvers import Euler, Solver, time_grid
from rfkit.timesteps import TimestepSampler, Uniform
from rfkit.weightings import LossWeighting

__all__ = [
    "COUPLING_RULES",
    "OBJECTIVE_RULES",
    "SAMPLER_RULES",
    "SOLVER_RULES",
    "WEIGHTING_RULES",
    "check_coupling",
    "check_objective",
    "check_sampler",
    "check_solver",
    "check_weighting",
]


class _Broken(Exception):
    """A rule saw a violation; :func:`_run_rules` turns it into an AssertionError naming plugin and rule."""


def _require(ok: bool, plugin: object, what: str) -> None:
    del plugin  # named by _run_rules, with the rule
    if not ok:
        raise _Broken(what)


Rule = Callable[..., None]


def _run_rules(plugin: object, rules: Sequence[Rule], *args: Any) -> None:
    """Run ``rule(plugin, *args)`` for each rule in order; the first broken one raises AssertionError
    ``"<repr> breaks the rule '<name>': <what was seen>"``."""
    for rule in rules:
        try:
            rule(plugin, *args)
        except _Broken as err:
            raise AssertionError(f"{plugin!r} breaks the rule {rule.__name__!r}: {err}") from None


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rng_untouched(plugin: object, call) -> object:
    """Run ``call()`` and require that it left torch's global RNG as it was (it must use its generator)."""
    state = torch.get_rng_state()
    out = call()
    _require(
        torch.equal(state, torch.get_rng_state()),
        plugin,
        "given a generator, it drew from torch's global RNG too; draw only from `generator` so runs reproduce",
    )
    return out


# --------------------------------------------------------------------------------------------
# Timestep samplers
# --------------------------------------------------------------------------------------------


def is_a_sampler(sampler, ctx) -> None:
    """It subclasses :class:`rfkit.timesteps.TimestepSampler`."""
    _require(isinstance(sampler, TimestepSampler), sampler, "it must subclass rfkit.timesteps.TimestepSampler")


def draws_only_from_its_generator(sampler, ctx) -> None:
    """Given a generator, it leaves torch's global RNG alone (runs then reproduce)."""
    ctx["t"] = _rng_untouched(sampler, lambda: sampler(ctx["n"], generator=_gen(ctx["seed"])))


def draws_are_float32_in_the_open_interval(sampler, ctx) -> None:
    """``sampler(n)`` is a (n,) float32 tensor inside (0, 1)."""
    t, n = ctx["t"], ctx["n"]
    _require(isinstance(t, Tensor), sampler, f"__call__ must return a torch.Tensor, got {type(t).__name__}")
    _require(t.shape == (n,), sampler, f"__call__(n={n}) must return shape ({n},), got {tuple(t.shape)}")
    _require(t.dtype == torch.float32, sampler, f"draws must be float32, got {t.dtype}")
    inside = (t > 0) & (t < 1)
    _require(
        bool(inside.all()),
        sampler,
        f"draws must lie in the open interval (0, 1); {int((~inside).sum())} of {n} do not "
        f"(min {float(t.min())}, max {float(t.max())}); clamp them by one float32 ulp",
    )


def the_generator_decides_the_draws(sampler, ctx) -> None:
    """The same generator seed gives the same draws whatever torch's global seed; another seed, others."""
    seed = ctx["seed"]
    torch.manual_seed(1)
    a = sampler(256, generator=_gen(seed + 1))
    torch.manual_seed(2)
    b = sampler(256, generator=_gen(seed + 1))
    _require(torch.equal(a, b), sampler, "the same generator seed must give the same draws")
    c = sampler(256, generator=_gen(seed + 2))
    _require(not torch.equal(a, c), sampler, "different generator seeds must give different draws")


def honours_device_and_resolution(sampler, ctx) -> None:
    """``sampler(1, device="cpu")`` is (1,) on the CPU; ``for_tokens`` returns a sampler."""
    small = sampler(1, device="cpu")
    _require(small.shape == (1,) and small.device.type == "cpu", sampler, "n=1 on device='cpu' must give (1,) on cpu")
    _require(isinstance(sampler.for_tokens(256), TimestepSampler), sampler, "for_tokens must return a sampler")


def density_is_a_density(sampler, ctx) -> None:
    """``density`` is finite, non-negative and integrates to 1 over (0, 1) (integrated over
    ``z = logit(t)`` in [-36, 36], ``dt = t (1 - t) dz``, which resolves densities that blow up at
    either end; sigmoid(36) still rounds below 1 in float64)."""
    z = torch.linspace(-36.0, 36.0, 200_001, dtype=torch.float64)
    grid = torch.sigmoid(z)
    p = sampler.density(grid.clone())
    _require(isinstance(p, Tensor) and p.shape == grid.shape, sampler, "density(t) must return a tensor shaped like t")
    p = p.double().numpy()
    _require(bool(np.isfinite(p).all()), sampler, "density must be finite inside (0, 1)")
    _require(bool((p >= 0).all()), sampler, f"density must be >= 0, got min {p.min():.3g}")
    cdf = integrate.cumulative_trapezoid(p * (grid * (1 - grid)).numpy(), z.numpy(), initial=0.0)
    mass = float(cdf[-1])
    _require(abs(mass - 1.0) < 1e-3, sampler, f"density must integrate to 1 over (0, 1), got {mass:.6f}")
    ctx["z"], ctx["cdf"] = z.numpy(), cdf / mass


def draws_follow_the_density(sampler, ctx) -> None:
    """A one-sample KS test of the ``n`` draws against the CDF of ``density`` does not reject at ``alpha``."""
    n, alpha = ctx["n"], ctx["alpha"]
    drawn = torch.logit(ctx["t"].double()).numpy()
    p_value = stats.kstest(drawn, lambda x: np.interp(x, ctx["z"], ctx["cdf"])).pvalue
    _require(
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
    _run_rules(sampler, SAMPLER_RULES, {"n": n, "seed": seed, "alpha": alpha})


# --------------------------------------------------------------------------------------------
# Couplings
# --------------------------------------------------------------------------------------------


def _row_matches(rows: Tensor, source: Tensor) -> Tensor:
    """(n, m) bool: row i of ``rows`` equals row j of ``source`` exactly."""
    a, b = rows.flatten(1), source.flatten(1).to(rows.dtype)
    return (a[:, None, :] == b[None, :, :]).all(-1)


def _call_coupling(coupling: Coupling, x0, x1, noise, seed, cond):
    try:
        return coupling(x0, x1, noise=noise, generator=_gen(seed), cond=cond)
    except TypeError as err:
        if "cond" in str(err):
            raise _Broken(
                "__call__ must accept the keyword `cond` "
                "(x0, x1, *, noise=None, generator=None, cond=None), even if it ignores it"
            ) from err
        raise


def _raises_value_error(coupling: Coupling, call, what: str) -> None:
    try:
        call()
    except ValueError as err:
        _require(bool(str(err)), coupling, f"the ValueError for {what} must say what is wrong")
        return
    raise _Broken(f"{what} must raise ValueError naming the problem")


def is_a_coupling(coupling, ctx) -> None:
    """It subclasses :class:`rfkit.couplings.Coupling`."""
    _require(isinstance(coupling, Coupling), coupling, "it must subclass rfkit.couplings.Coupling")


def returns_the_pair_without_the_global_rng(coupling, ctx) -> None:
    """``coupling(x0, x1, *, noise, generator, cond)`` returns two tensors and, given a generator,
    leaves torch's global RNG alone."""
    out = _rng_untouched(
        coupling, lambda: _call_coupling(coupling, ctx["x0"], ctx["x1"], ctx["noise"], ctx["seed"], ctx["cond"])
    )
    _require(
        isinstance(out, tuple | list) and len(out) == 2 and all(isinstance(o, Tensor) for o in out),
        coupling,
        f"__call__ must return a pair of tensors (x0', x1), got {type(out).__name__}",
    )
    ctx["y0"], ctx["y1"] = out


def x1_comes_back_untouched(coupling, ctx) -> None:
    """The second tensor is ``x1`` itself, or an identical one: labels and text are indexed like it."""
    y1, x1 = ctx["y1"], ctx["x1"]
    _require(
        y1 is x1 or (y1.shape == x1.shape and y1.dtype == x1.dtype and torch.equal(y1, ctx["before"]["x1"])),
        coupling,
        "x1 must come back untouched (labels and text are indexed like x1); reorder or replace x0 only",
    )


def inputs_are_not_modified(coupling, ctx) -> None:
    """No input (x0, x1, noise, cond) is modified in place."""
    for name, value in ctx["before"].items():
        _require(torch.equal(ctx["inputs"][name], value), coupling, f"{name} was modified in place; return new tensors")


def noise_is_shaped_like_x1_and_finite(coupling, ctx) -> None:
    """``x0'`` has ``x1``'s shape, dtype and device, and is finite."""
    y0, x1 = ctx["y0"], ctx["x1"]
    _require(y0.shape == x1.shape, coupling, f"x0' must have x1's shape {tuple(x1.shape)}, got {tuple(y0.shape)}")
    _require(y0.dtype == x1.dtype, coupling, f"x0' must have x1's dtype {x1.dtype}, got {y0.dtype}")
    _require(y0.device == x1.device, coupling, f"x0' must be on x1's device {x1.device}, got {y0.device}")
    _require(bool(torch.isfinite(y0).all()), coupling, "x0' must be finite")


def noise_rows_come_from_the_source(coupling, ctx) -> None:
    """Every row of ``x0'`` is a row of ``rows_of`` (unless None); with ``permutation``, each exactly once."""
    rows_of = ctx["rows_of"]
    if rows_of is None:
        return
    match = _row_matches(ctx["y0"], ctx["x0"] if rows_of == "x0" else ctx["noise"])
    _require(bool(match.any(1).all()), coupling, f"every row of x0' must be a row of {rows_of}")
    if ctx["permutation"]:
        used = match.float().argmax(1)
        _require(
            torch.equal(used.sort().values, torch.arange(len(used), device=used.device)),
            coupling,
            f"x0' must be a permutation of {rows_of} (every row used exactly once), "
            f"but {len(used) - len(used.unique())} rows repeat",
        )


def the_generator_decides_the_pairs(coupling, ctx) -> None:
    """The same generator seed gives the same pairs."""
    again = _call_coupling(coupling, ctx["x0"], ctx["x1"], ctx["noise"], ctx["seed"], ctx["cond"])[0]
    _require(torch.equal(ctx["y0"], again), coupling, "the same generator seed must give the same pairs")


def bad_batches_raise_value_error(coupling, ctx) -> None:
    """A batch-size mismatch and a NaN in ``x1`` raise ``ValueError`` saying what is wrong."""
    x0, x1, noise, cond = ctx["x0"], ctx["x1"], ctx["noise"], ctx["cond"]
    n = x1.shape[0]
    longer = torch.cat([x1, x1[:1]])
    _raises_value_error(
        coupling, lambda: coupling(x0, longer, noise=noise, cond=cond), f"x1 with {n + 1} rows against {n} noise rows"
    )
    bad = x1.clone()
    bad[(0,) * bad.ndim] = float("nan")
    _raises_value_error(coupling, lambda: coupling(x0, bad, noise=noise, cond=cond), "a NaN in x1")


COUPLING_RULES: tuple[Rule, ...] = (
    is_a_coupling,
    returns_the_pair_without_the_global_rng,
    x1_comes_back_untouched,
    inputs_are_not_modified,
    noise_is_shaped_like_x1_and_finite,
    noise_rows_come_from_the_source,
    the_generator_decides_the_pairs,
    bad_batches_raise_value_error,
)


def check_coupling(
    coupling: Coupling,
    x0: Tensor | None = None,
    x1: Tensor | None = None,
    *,
    noise: Tensor | None = None,
    cond: Mapping[str, Tensor] | None = None,
    rows_of: Literal["x0", "noise"] | None = "x0",
    permutation: bool = False,
    seed: int = 0,
) -> None:
    """Check a :class:`~rfkit.couplings.Coupling` on one batch against :data:`COUPLING_RULES`.

    Args:
        coupling: the plugin.
        x0, x1: a batch (n, *shape); default 16 Gaussian noise rows and 16 shifted "data" rows
            of shape (4, 2, 2).
        noise: the batch's stored noise (reflow pairs); made for you when ``rows_of="noise"``.
        cond: conditioning indexed like ``x1`` (e.g. ``{"cls": labels}``), for couplings that read it.
        rows_of: every row of ``x0'`` must be a row of this input ("x0": reorders or resamples
            the fresh noise; "noise": uses the stored noise), or None for couplings that make
            new noise.
        permutation: additionally, every source row is used exactly once (exact OT, say).
        seed: generator seed for the coupling's own draws.
    """
    g = _gen(1234)
    x0 = torch.randn(16, 4, 2, 2, generator=g) if x0 is None else x0
    x1 = (torch.randn(x0.shape, generator=g) * 0.5 + 2.0).to(x0) if x1 is None else x1
    if noise is None and rows_of == "noise":
        noise = torch.randn(x1.shape, generator=g).to(x1)
    inputs = {"x0": x0, "x1": x1, "noise": noise, **{f"cond[{k!r}]": v for k, v in (cond or {}).items()}}
    ctx = {
        "x0": x0,
        "x1": x1,
        "noise": noise,
        "cond": cond,
        "rows_of": rows_of,
        "permutation": permutation,
        "seed": seed,
        "inputs": inputs,
        "before": {k: v.clone() for k, v in inputs.items() if v is not None},
    }
    _run_rules(coupling, COUPLING_RULES, ctx)


# --------------------------------------------------------------------------------------------
# Loss weightings
# --------------------------------------------------------------------------------------------


def is_a_weighting(weighting, ctx) -> None:
    """It subclasses :class:`rfkit.weightings.LossWeighting`."""
    _require(isinstance(weighting, LossWeighting), weighting, "it must subclass rfkit.weightings.LossWeighting")


def weights_are_finite_nonnegative_tensors_like_t(weighting, ctx) -> None:
    """In float32 and float64 on t from 1e-4 to 1 - 1e-4: ``w(t)`` has ``t``'s shape, dtype and device,
    is finite and >= 0, and ``t`` is not modified in place."""
    for t in ctx["ts"]:
        kept = t.clone()
        w = weighting(t)
        _require(isinstance(w, Tensor), weighting, f"it must return a tensor, got {type(w).__name__}")
        _require(w.shape == t.shape, weighting, f"w(t) must have t's shape {tuple(t.shape)}, got {tuple(w.shape)}")
        _require(w.dtype == t.dtype, weighting, f"w(t) must have t's dtype {t.dtype}, got {w.dtype}")
        _require(w.device == t.device, weighting, "w(t) must be on t's device")
        _require(torch.equal(t, kept), weighting, "t was modified in place")
        finite = torch.isfinite(w)
        _require(bool(finite.all()), weighting, f"w(t) must be finite; not at t = {t[~finite][:3].tolist()}")
        _require(bool((w >= 0).all()), weighting, f"w(t) must be >= 0; got {float(w.min()):.3g}")


def weights_depend_on_each_t_alone(weighting, ctx) -> None:
    """``w(t)[i]`` equals ``w(t[i:i+1])``: no normalisation over the batch."""
    for t in ctx["ts"]:
        w = weighting(t)
        for i in (0, 500, 998):
            one = weighting(t[i : i + 1])
            _require(
                torch.allclose(one, w[i : i + 1], rtol=1e-5, atol=0),
                weighting,
                f"w must depend on each sample's t alone: w(t)[{i}] = {float(w[i]):.6g} in a batch, "
                f"{float(one[0]):.6g} on its own",
            )


WEIGHTING_RULES: tuple[Rule, ...] = (
    is_a_weighting,
    weights_are_finite_nonnegative_tensors_like_t,
    weights_depend_on_each_t_alone,
)


def check_weighting(weighting: LossWeighting) -> None:
    """Check a :class:`~rfkit.weightings.LossWeighting` against :data:`WEIGHTING_RULES`."""
    order = torch.randperm(999, generator=_gen(0))
    ts = [torch.linspace(1e-4, 1 - 1e-4, 999, dtype=dtype)[order] for dtype in (torch.float32, torch.float64)]
    _run_rules(weighting, WEIGHTING_RULES, {"ts": ts})


# --------------------------------------------------------------------------------------------
# ODE solvers
# --------------------------------------------------------------------------------------------


def _solve(solver: Solver, field, x0: Tensor, t_grid: Tensor) -> tuple[Tensor, int]:
    """Integrate while checking every call's shapes; return the result and the number of calls."""
    calls = 0

    def v(x: Tensor, t: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        _require(x.shape == x0.shape, solver, f"velocity_fn got x of shape {tuple(x.shape)}, not {tuple(x0.shape)}")
        _require(t.shape == (x0.shape[0],), solver, f"velocity_fn got t of shape {tuple(t.shape)}, not (n,)")
        return field(x, t)

    return solver(v, x0, t_grid), calls


def is_a_solver(solver, ctx) -> None:
    """It subclasses :class:`rfkit.solvers.Solver`."""
    _require(isinstance(solver, Solver), solver, "it must subclass rfkit.solvers.Solver")


def integrates_a_constant_field_exactly(solver, ctx) -> None:
    """On ``v = c`` it returns ``x0 + c (t_K - t_0)`` on a uniform and a shifted grid, with ``x0``'s
    shape and dtype, leaves ``x0`` alone, and calls the velocity with x (n, *shape) and t (n,),
    exactly ``solver.nfe(steps)`` times."""
    g = _gen(0)
    x0 = torch.randn(5, 3, 2, generator=g, dtype=torch.float64)
    c = torch.randn(5, 3, 2, generator=g, dtype=torch.float64)
    for steps, shift in ((5, 1.0), (7, 3.0)):
        grid = time_grid(steps, shift, dtype=torch.float64)
        kept = x0.clone()
        x1, calls = _solve(solver, lambda x, t: c, x0, grid)
        _require(torch.equal(x0, kept), solver, "x0 was modified in place")
        _require(x1.shape == x0.shape and x1.dtype == x0.dtype, solver, "the result must have x0's shape and dtype")
        _require(
            torch.allclose(x1, x0 + c, rtol=0, atol=1e-10),
            solver,
            f"a constant velocity must be integrated exactly ({steps} steps, shift {shift}); "
            f"max error {float((x1 - x0 - c).abs().max()):.3g}",
        )
        _require(
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
    x0 = torch.randn(5, 3, 2, generator=_gen(0), dtype=torch.float64)
    errors = []
    for steps in (16, 32):
        x1, _ = _solve(solver, lambda x, t: -2.0 * t.reshape(-1, 1, 1) * x, x0, time_grid(steps, dtype=torch.float64))
        errors.append(float((x1 - x0 * math.exp(-1.0)).abs().max()))
    measured = math.log2(errors[0] / max(errors[1], 1e-300))
    _require(
        measured >= order - 0.3,
        solver,
        f"claimed order {order}, measured {measured:.2f} (errors {errors[0]:.2e} at 16 steps, {errors[1]:.2e} at 32)",
    )


SOLVER_RULES: tuple[Rule, ...] = (is_a_solver, integrates_a_constant_field_exactly, has_the_claimed_order)


def check_solver(solver: Solver, *, order: int | None = None) -> None:
    """Check a :class:`~rfkit.solvers.Solver` against :data:`SOLVER_RULES`; ``order``: the claimed order
    of accuracy, if any."""
    _run_rules(solver, SOLVER_RULES, {"order": order})


# --------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------


def is_an_objective(objective, ctx) -> None:
    """It subclasses :class:`rfkit.objectives.Objective`, and its ``setup`` accepts a model with a second time."""
    _require(isinstance(objective, Objective), objective, "it must subclass rfkit.objectives.Objective")
    objective.setup(ctx["model"])


def loss_is_a_finite_per_sample_loss_from_the_draws(objective, ctx) -> None:
    """``loss`` returns (per_sample, t), both (n,), finite, the loss >= 0 with finite gradients on the weights
    and t in [0, 1]; the step's draws alone decide it (same draws, same loss; the global RNG untouched), with
    and without label dropout, under a minibatch-OT coupling."""
    model, batch, n, seed = ctx["model"], ctx["batch"], ctx["n"], ctx["seed"]
    axes = {"coupling": MinibatchOT(), "timesteps": Uniform()}
    for dropout in (0.0, 0.5):

        def call(d=dropout):
            return objective.loss(model, batch, RowDraws(seed, 0, n), cond_dropout=d, **axes)

        out = _rng_untouched(objective, call)
        _require(isinstance(out, tuple) and len(out) == 2, objective, "loss must return (per_sample, t)")
        per, t = out
        _require(
            per.shape == (n,) and t.shape == (n,),
            objective,
            f"per_sample and t must be ({n},), got {tuple(per.shape)}, {tuple(t.shape)}",
        )
        _require(bool(torch.isfinite(per).all()) and bool((per >= 0).all()), objective, "the loss must be finite, >= 0")
        _require(bool(((t >= 0) & (t <= 1)).all()), objective, "timesteps must lie in [0, 1]")
        _require(torch.equal(per.detach(), call()[0].detach()), objective, "the same draws must give the same loss")
        model.zero_grad()
        per.mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        _require(
            bool(grads) and all(bool(torch.isfinite(x).all()) for x in grads),
            objective,
            "the loss must have finite gradients on the weights",
        )


def fixed_t_comes_back(objective, ctx) -> None:
    """Given fixed t (validation), ``loss`` returns those t and a finite (n,) loss."""
    fixed = torch.linspace(0.05, 0.95, ctx["n"])
    axes = {"coupling": MinibatchOT(), "timesteps": Uniform()}
    per, t = objective.loss(ctx["model"], ctx["batch"], RowDraws(ctx["seed"], 0, ctx["n"]), t=fixed, **axes)
    _require(torch.equal(t, fixed), objective, "given fixed t, loss must return those t")
    _require(per.shape == fixed.shape and bool(torch.isfinite(per).all()), objective, "the fixed-t loss must be finite")


def sample_spends_what_nfe_says(objective, ctx) -> None:
    """``sample`` returns x0's shape and dtype, finite, leaves x0 alone, and calls the network exactly
    ``nfe(solver, steps)`` times."""
    model, calls = ctx["model"], [0]
    handle = model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    x0 = torch.randn(8, 2, generator=_gen(ctx["seed"]))
    kept = x0.clone()
    try:
        for steps in (1, 3):
            calls[0] = 0
            with torch.no_grad():
                x1 = objective.sample(model, x0, {"cls": torch.arange(8) % 3}, solver=Euler(), num_steps=steps)
            _require(torch.equal(x0, kept), objective, "sample modified x0 in place")
            _require(x1.shape == x0.shape and x1.dtype == x0.dtype, objective, "samples must have x0's shape and dtype")
            _require(bool(torch.isfinite(x1).all()), objective, "samples must be finite")
            _require(
                calls[0] == objective.nfe(Euler(), steps),
                objective,
                f"nfe(Euler(), {steps}) = {objective.nfe(Euler(), steps)}, but sample made {calls[0]} network calls",
            )
    finally:
        handle.remove()


OBJECTIVE_RULES: tuple[Rule, ...] = (
    is_an_objective,
    loss_is_a_finite_per_sample_loss_from_the_draws,
    fixed_t_comes_back,
    sample_spends_what_nfe_says,
)


def check_objective(objective: Objective, *, n: int = 32, seed: int = 0) -> None:
    """Check a :class:`~rfkit.objectives.Objective` against :data:`OBJECTIVE_RULES`, on a small
    class-conditional MLP with a second time (random weights, so the second time matters)."""
    torch.manual_seed(seed)
    model = MLP(dim=2, width=16, depth=2, num_classes=3, second_time=True)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    g = _gen(seed)
    batch = {"latent": torch.randn(n, 2, generator=g) + 2, "cls": torch.randint(0, 3, (n,), generator=g)}
    _run_rules(objective, OBJECTIVE_RULES, {"model": model, "batch": batch, "n": n, "seed": seed})
