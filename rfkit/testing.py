"""Contract checks for plugins: call them from your own tests, one per axis.

Each check exercises the rules every implementation of an axis must keep (docs/design.md §3) and raises
``AssertionError`` naming the plugin and the rule it broke, so it works with plain ``assert``-style
test runners and with pytest alike::

    from rfkit.testing import check_coupling, check_objective, check_sampler

    def test_my_sampler():
        check_sampler(MySampler(k=3))

    def test_my_coupling():
        check_coupling(MyCoupling(), permutation=True)

rfkit's own built-ins pass through the same checks in its test suite. The statistical checks use
fixed seeds, so a given plugin passes or fails deterministically; a correct sampler fails the KS
test at one seed in a thousand (``alpha``), and ``seed`` picks another draw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

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

__all__ = ["check_coupling", "check_objective", "check_sampler", "check_solver", "check_weighting"]


def _require(ok: bool, plugin: object, rule: str) -> None:
    if not ok:
        raise AssertionError(f"{plugin!r} breaks the contract: {rule}")


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


def check_sampler(sampler: TimestepSampler, *, n: int = 20_000, seed: int = 0, alpha: float = 1e-3) -> None:
    """Check a :class:`~rfkit.timesteps.TimestepSampler`.

    Rules: draws are a (n,) float32 tensor inside the open interval (0, 1); the same seed gives the
    same draws whatever torch's global seed, another seed other draws, and the global RNG is not
    used; ``device`` is honoured; ``density`` is finite, non-negative and integrates to 1; and the
    draws follow it: a one-sample KS test of ``n`` draws against the CDF obtained by integrating
    ``density`` must not reject at level ``alpha``. The integrals run over ``z = logit(t)`` in
    [-36, 36] (``dt = t (1 - t) dz``; sigmoid(36) still rounds below 1 in float64), which resolves
    densities that blow up at either end.
    """
    _require(isinstance(sampler, TimestepSampler), sampler, "it must subclass rfkit.timesteps.TimestepSampler")
    t = _rng_untouched(sampler, lambda: sampler(n, generator=_gen(seed)))
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
    # the generator decides the draws: reseeding torch's global RNG must change nothing
    torch.manual_seed(1)
    a = sampler(256, generator=_gen(seed + 1))
    torch.manual_seed(2)
    b = sampler(256, generator=_gen(seed + 1))
    _require(torch.equal(a, b), sampler, "the same generator seed must give the same draws")
    c = sampler(256, generator=_gen(seed + 2))
    _require(not torch.equal(a, c), sampler, "different generator seeds must give different draws")
    small = sampler(1, device="cpu")
    _require(small.shape == (1,) and small.device.type == "cpu", sampler, "n=1 on device='cpu' must give (1,) on cpu")
    _require(isinstance(sampler.for_tokens(256), TimestepSampler), sampler, "for_tokens must return a sampler")

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
    drawn = torch.logit(t.double()).numpy()
    p_value = stats.kstest(drawn, lambda x: np.interp(x, z.numpy(), cdf / mass)).pvalue
    _require(
        p_value > alpha,
        sampler,
        f"the draws do not follow density(): KS test of {n} draws against its CDF, p = {p_value:.2e} < {alpha}",
    )


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
            raise AssertionError(
                f"{coupling!r} breaks the contract: __call__ must accept the keyword `cond` "
                "(x0, x1, *, noise=None, generator=None, cond=None), even if it ignores it"
            ) from err
        raise


def _raises_value_error(coupling: Coupling, call, what: str) -> None:
    try:
        call()
    except ValueError as err:
        _require(bool(str(err)), coupling, f"the ValueError for {what} must say what is wrong")
        return
    raise AssertionError(f"{coupling!r} breaks the contract: {what} must raise ValueError naming the problem")


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
    """Check a :class:`~rfkit.couplings.Coupling` on one batch.

    Rules: it returns ``(x0', x1)`` with ``x1`` untouched (the same tensor, or an identical one);
    ``x0'`` is finite and has ``x1``'s shape, dtype and device; no input is modified in place; the
    same generator seed gives the same pairs without touching torch's global RNG; a batch-size
    mismatch and a non-finite ``x1`` raise ``ValueError``.

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
    _require(isinstance(coupling, Coupling), coupling, "it must subclass rfkit.couplings.Coupling")
    g = _gen(1234)
    x0 = torch.randn(16, 4, 2, 2, generator=g) if x0 is None else x0
    x1 = (torch.randn(x0.shape, generator=g) * 0.5 + 2.0).to(x0) if x1 is None else x1
    if noise is None and rows_of == "noise":
        noise = torch.randn(x1.shape, generator=g).to(x1)
    inputs = {"x0": x0, "x1": x1, "noise": noise, **{f"cond[{k!r}]": v for k, v in (cond or {}).items()}}
    before = {k: v.clone() for k, v in inputs.items() if v is not None}

    out = _rng_untouched(coupling, lambda: _call_coupling(coupling, x0, x1, noise, seed, cond))
    _require(
        isinstance(out, tuple | list) and len(out) == 2 and all(isinstance(o, Tensor) for o in out),
        coupling,
        f"__call__ must return a pair of tensors (x0', x1), got {type(out).__name__}",
    )
    y0, y1 = out
    _require(
        y1 is x1 or (y1.shape == x1.shape and y1.dtype == x1.dtype and torch.equal(y1, before["x1"])),
        coupling,
        "x1 must come back untouched (labels and text are indexed like x1); reorder or replace x0 only",
    )
    for name, value in before.items():
        _require(torch.equal(inputs[name], value), coupling, f"{name} was modified in place; return new tensors")
    _require(y0.shape == x1.shape, coupling, f"x0' must have x1's shape {tuple(x1.shape)}, got {tuple(y0.shape)}")
    _require(y0.dtype == x1.dtype, coupling, f"x0' must have x1's dtype {x1.dtype}, got {y0.dtype}")
    _require(y0.device == x1.device, coupling, f"x0' must be on x1's device {x1.device}, got {y0.device}")
    _require(bool(torch.isfinite(y0).all()), coupling, "x0' must be finite")
    if rows_of is not None:
        match = _row_matches(y0, x0 if rows_of == "x0" else noise)
        _require(bool(match.any(1).all()), coupling, f"every row of x0' must be a row of {rows_of}")
        if permutation:
            used = match.float().argmax(1)
            _require(
                torch.equal(used.sort().values, torch.arange(len(used), device=used.device)),
                coupling,
                f"x0' must be a permutation of {rows_of} (every row used exactly once), "
                f"but {len(used) - len(used.unique())} rows repeat",
            )
    again = _call_coupling(coupling, x0, x1, noise, seed, cond)[0]
    _require(torch.equal(y0, again), coupling, "the same generator seed must give the same pairs")

    n = x1.shape[0]
    longer = torch.cat([x1, x1[:1]])
    _raises_value_error(
        coupling, lambda: coupling(x0, longer, noise=noise, cond=cond), f"x1 with {n + 1} rows against {n} noise rows"
    )
    bad = x1.clone()
    bad[(0,) * bad.ndim] = float("nan")
    _raises_value_error(coupling, lambda: coupling(x0, bad, noise=noise, cond=cond), "a NaN in x1")


# --------------------------------------------------------------------------------------------
# Loss weightings
# --------------------------------------------------------------------------------------------


def check_weighting(weighting: LossWeighting) -> None:
    """Check a :class:`~rfkit.weightings.LossWeighting`.

    Rules, in float32 and float64 on t from 1e-4 to 1 - 1e-4: ``w(t)`` is a tensor of ``t``'s shape,
    dtype and device, finite and >= 0; it is a function of each sample's t alone (``w(t)[i]`` equals
    ``w(t[i:i+1])``: no normalisation over the batch); ``t`` is not modified in place.
    """
    _require(isinstance(weighting, LossWeighting), weighting, "it must subclass rfkit.weightings.LossWeighting")
    for dtype in (torch.float32, torch.float64):
        t = torch.linspace(1e-4, 1 - 1e-4, 999, dtype=dtype)[torch.randperm(999, generator=_gen(0))]
        kept = t.clone()
        w = weighting(t)
        _require(isinstance(w, Tensor), weighting, f"it must return a tensor, got {type(w).__name__}")
        _require(w.shape == t.shape, weighting, f"w(t) must have t's shape {tuple(t.shape)}, got {tuple(w.shape)}")
        _require(w.dtype == dtype, weighting, f"w(t) must have t's dtype {dtype}, got {w.dtype}")
        _require(w.device == t.device, weighting, "w(t) must be on t's device")
        _require(torch.equal(t, kept), weighting, "t was modified in place")
        finite = torch.isfinite(w)
        _require(bool(finite.all()), weighting, f"w(t) must be finite; not at t = {t[~finite][:3].tolist()}")
        _require(bool((w >= 0).all()), weighting, f"w(t) must be >= 0; got {float(w.min()):.3g}")
        for i in (0, 500, 998):
            one = weighting(t[i : i + 1])
            _require(
                torch.allclose(one, w[i : i + 1], rtol=1e-5, atol=0),
                weighting,
                f"w must depend on each sample's t alone: w(t)[{i}] = {float(w[i]):.6g} in a batch, "
                f"{float(one[0]):.6g} on its own",
            )


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


def check_solver(solver: Solver, *, order: int | None = None) -> None:
    """Check a :class:`~rfkit.solvers.Solver`.

    Rules: on a constant field ``v = c`` it is exact (``x0 + c (t_K - t_0)``) on a uniform and a
    shifted grid; it returns ``x0``'s shape and dtype and leaves ``x0`` alone; it calls the velocity
    with x (n, *shape) and t (n,), exactly ``solver.nfe(steps)`` times. With ``order``: on
    ``dx/dt = -2 t x`` (solution ``x0 exp(-t^2)``) halving the step divides the error at t = 1 by
    about ``2^order`` (measured order >= order - 0.3, from 16 to 32 steps, float64).
    """
    _require(isinstance(solver, Solver), solver, "it must subclass rfkit.solvers.Solver")
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
    if order is None:
        return
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


# --------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------


def check_objective(objective: Objective, *, n: int = 32, seed: int = 0) -> None:
    """Check a :class:`~rfkit.objectives.Objective` on a small class-conditional MLP with a second time.

    Rules: ``setup`` accepts the model; ``loss`` returns a per-sample loss and timesteps, both (n,),
    finite, the loss >= 0 with a gradient that reaches the weights finitely and the timesteps in
    [0, 1]; the step's ``draws`` alone decide it (the same draws give the same loss, torch's global
    RNG is untouched), with and without label dropout, with a minibatch-OT coupling; given fixed
    ``t``, it returns those t; ``sample`` returns ``x0``'s shape and dtype, finite, with exactly
    ``nfe(solver, steps)`` network evaluations, without modifying ``x0``.
    """
    _require(isinstance(objective, Objective), objective, "it must subclass rfkit.objectives.Objective")
    torch.manual_seed(seed)
    model = MLP(dim=2, width=16, depth=2, num_classes=3, second_time=True)
    for p in model.parameters():  # a second-time embedding that matters
        torch.nn.init.normal_(p, std=0.3)
    objective.setup(model)
    g = _gen(seed)
    batch = {"latent": torch.randn(n, 2, generator=g) + 2, "cls": torch.randint(0, 3, (n,), generator=g)}
    axes = {"coupling": MinibatchOT(), "timesteps": Uniform()}
    for dropout in (0.0, 0.5):
        out = _rng_untouched(
            objective, lambda d=dropout: objective.loss(model, batch, RowDraws(seed, 0, n), cond_dropout=d, **axes)
        )
        _require(isinstance(out, tuple) and len(out) == 2, objective, "loss must return (per_sample, t)")
        per, t = out
        _require(
            per.shape == (n,) and t.shape == (n,),
            objective,
            f"per_sample and t must be ({n},), got {tuple(per.shape)}, {tuple(t.shape)}",
        )
        _require(
            bool(torch.isfinite(per).all()) and bool((per >= 0).all()), objective, "the loss must be finite and >= 0"
        )
        _require(bool(((t >= 0) & (t <= 1)).all()), objective, "timesteps must lie in [0, 1]")
        again, _ = objective.loss(model, batch, RowDraws(seed, 0, n), cond_dropout=dropout, **axes)
        _require(torch.equal(per.detach(), again.detach()), objective, "the same draws must give the same loss")
        model.zero_grad()
        per.mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        _require(
            bool(grads) and all(bool(torch.isfinite(x).all()) for x in grads),
            objective,
            "the loss must have finite gradients on the weights",
        )
    fixed = torch.linspace(0.05, 0.95, n)
    per, t = objective.loss(model, batch, RowDraws(seed, 0, n), t=fixed, **axes)
    _require(torch.equal(t, fixed), objective, "given fixed t, loss must return those t")
    _require(per.shape == (n,) and bool(torch.isfinite(per).all()), objective, "the fixed-t loss must be finite, (n,)")

    calls = 0

    def count(*_):
        nonlocal calls
        calls += 1

    handle = model.register_forward_hook(count)
    x0 = torch.randn(8, 2, generator=g)
    kept = x0.clone()
    try:
        for steps in (1, 3):
            calls = 0
            with torch.no_grad():
                x1 = objective.sample(model, x0, {"cls": torch.arange(8) % 3}, solver=Euler(), num_steps=steps)
            _require(torch.equal(x0, kept), objective, "sample modified x0 in place")
            _require(x1.shape == x0.shape and x1.dtype == x0.dtype, objective, "samples must have x0's shape and dtype")
            _require(bool(torch.isfinite(x1).all()), objective, "samples must be finite")
            _require(
                calls == objective.nfe(Euler(), steps),
                objective,
                f"nfe(Euler(), {steps}) = {objective.nfe(Euler(), steps)}, but sample made {calls} network calls",
            )
    finally:
        handle.remove()
