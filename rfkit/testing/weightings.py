"""Loss weightings: the rules every :class:`~rfkit.weightings.LossWeighting` keeps, and
:func:`check_weighting`."""

from __future__ import annotations

import torch
from torch import Tensor

from rfkit.testing.rules import Rule, gen, require, run_rules
from rfkit.weightings import LossWeighting


def is_a_weighting(weighting, ctx) -> None:
    """It subclasses :class:`rfkit.weightings.LossWeighting`."""
    require(isinstance(weighting, LossWeighting), weighting, "it must subclass rfkit.weightings.LossWeighting")


def weights_are_finite_nonnegative_tensors_like_t(weighting, ctx) -> None:
    """In float32 and float64 on t from 1e-4 to 1 - 1e-4: ``w(t)`` has ``t``'s shape, dtype and device,
    is finite and >= 0, and ``t`` is not modified in place."""
    for t in ctx["ts"]:
        kept = t.clone()
        w = weighting(t)
        require(isinstance(w, Tensor), weighting, f"it must return a tensor, got {type(w).__name__}")
        require(w.shape == t.shape, weighting, f"w(t) must have t's shape {tuple(t.shape)}, got {tuple(w.shape)}")
        require(w.dtype == t.dtype, weighting, f"w(t) must have t's dtype {t.dtype}, got {w.dtype}")
        require(w.device == t.device, weighting, "w(t) must be on t's device")
        require(torch.equal(t, kept), weighting, "t was modified in place")
        finite = torch.isfinite(w)
        require(bool(finite.all()), weighting, f"w(t) must be finite; not at t = {t[~finite][:3].tolist()}")
        require(bool((w >= 0).all()), weighting, f"w(t) must be >= 0; got {float(w.min()):.3g}")


def weights_depend_on_each_t_alone(weighting, ctx) -> None:
    """``w(t)[i]`` equals ``w(t[i:i+1])``: no normalisation over the batch."""
    for t in ctx["ts"]:
        w = weighting(t)
        for i in (0, 500, 998):
            one = weighting(t[i : i + 1])
            require(
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
    order = torch.randperm(999, generator=gen(0))
    ts = [torch.linspace(1e-4, 1 - 1e-4, 999, dtype=dtype)[order] for dtype in (torch.float32, torch.float64)]
    run_rules(weighting, WEIGHTING_RULES, {"ts": ts})
