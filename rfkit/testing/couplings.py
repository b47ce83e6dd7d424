"""Couplings: the rules every :class:`~rfkit.couplings.Coupling` keeps, and :func:`check_coupling`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from rfkit.couplings import Coupling
from rfkit.testing.rules import Broken, Rule, gen, require, rng_untouched, run_rules


def _row_matches(rows: Tensor, source: Tensor) -> Tensor:
    """(n, m) bool: row i of ``rows`` equals row j of ``source`` exactly."""
    a, b = rows.flatten(1), source.flatten(1).to(rows.dtype)
    return (a[:, None, :] == b[None, :, :]).all(-1)


def _call_coupling(coupling: Coupling, x0, x1, noise, seed, cond):
    try:
        return coupling(x0, x1, noise=noise, generator=gen(seed), cond=cond)
    except TypeError as err:
        if "cond" in str(err):
            raise Broken(
                "__call__ must accept the keyword `cond` "
                "(x0, x1, *, noise=None, generator=None, cond=None), even if it ignores it"
            ) from err
        raise


def _raises_value_error(coupling: Coupling, call, what: str) -> None:
    try:
        call()
    except ValueError as err:
        require(bool(str(err)), coupling, f"the ValueError for {what} must say what is wrong")
        return
    raise Broken(f"{what} must raise ValueError naming the problem")


def is_a_coupling(coupling, ctx) -> None:
    """It subclasses :class:`rfkit.couplings.Coupling`."""
    require(isinstance(coupling, Coupling), coupling, "it must subclass rfkit.couplings.Coupling")


def returns_the_pair_without_the_global_rng(coupling, ctx) -> None:
    """``coupling(x0, x1, *, noise, generator, cond)`` returns two tensors and, given a generator,
    leaves torch's global RNG alone."""
    out = rng_untouched(
        coupling, lambda: _call_coupling(coupling, ctx["x0"], ctx["x1"], ctx["noise"], ctx["seed"], ctx["cond"])
    )
    require(
        isinstance(out, tuple | list) and len(out) == 2 and all(isinstance(o, Tensor) for o in out),
        coupling,
        f"__call__ must return a pair of tensors (x0', x1), got {type(out).__name__}",
    )
    ctx["y0"], ctx["y1"] = out


def x1_comes_back_untouched(coupling, ctx) -> None:
    """The second tensor is ``x1`` itself, or an identical one: labels and text are indexed like it."""
    y1, x1 = ctx["y1"], ctx["x1"]
    require(
        y1 is x1 or (y1.shape == x1.shape and y1.dtype == x1.dtype and torch.equal(y1, ctx["before"]["x1"])),
        coupling,
        "x1 must come back untouched (labels and text are indexed like x1); reorder or replace x0 only",
    )


def inputs_are_not_modified(coupling, ctx) -> None:
    """No input (x0, x1, noise, cond) is modified in place."""
    for name, value in ctx["before"].items():
        require(torch.equal(ctx["inputs"][name], value), coupling, f"{name} was modified in place; return new tensors")


def noise_is_shaped_like_x1_and_finite(coupling, ctx) -> None:
    """``x0'`` has ``x1``'s shape, dtype and device, and is finite."""
    y0, x1 = ctx["y0"], ctx["x1"]
    require(y0.shape == x1.shape, coupling, f"x0' must have x1's shape {tuple(x1.shape)}, got {tuple(y0.shape)}")
    require(y0.dtype == x1.dtype, coupling, f"x0' must have x1's dtype {x1.dtype}, got {y0.dtype}")
    require(y0.device == x1.device, coupling, f"x0' must be on x1's device {x1.device}, got {y0.device}")
    require(bool(torch.isfinite(y0).all()), coupling, "x0' must be finite")


def noise_rows_come_from_the_source(coupling, ctx) -> None:
    """Every row of ``x0'`` is a row of ``rows_of`` (unless None); with ``permutation``, each exactly once."""
    rows_of = ctx["rows_of"]
    if rows_of is None:
        return
    match = _row_matches(ctx["y0"], ctx["x0"] if rows_of == "x0" else ctx["noise"])
    require(bool(match.any(1).all()), coupling, f"every row of x0' must be a row of {rows_of}")
    if ctx["permutation"]:
        used = match.float().argmax(1)
        require(
            torch.equal(used.sort().values, torch.arange(len(used), device=used.device)),
            coupling,
            f"x0' must be a permutation of {rows_of} (every row used exactly once), "
            f"but {len(used) - len(used.unique())} rows repeat",
        )


def the_generator_decides_the_pairs(coupling, ctx) -> None:
    """The same generator seed gives the same pairs."""
    again = _call_coupling(coupling, ctx["x0"], ctx["x1"], ctx["noise"], ctx["seed"], ctx["cond"])[0]
    require(torch.equal(ctx["y0"], again), coupling, "the same generator seed must give the same pairs")


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
    g = gen(1234)
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
    run_rules(coupling, COUPLING_RULES, ctx)
