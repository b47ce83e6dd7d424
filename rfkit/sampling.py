"""Generating samples from a velocity model: classifier-free guidance on top of an ODE solver."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from rfkit.models.base import Cond, VelocityModel
from rfkit.solvers import Euler, Solver, VelocityFn, time_grid

__all__ = ["SamplingSettings", "generate", "guided_velocity"]


@dataclass(frozen=True)
class SamplingSettings:
    """How samples are drawn: the solver, its steps, the timestep shift and the guidance scale.

    One value for the module's defaults (``RectifiedFlow.sampling``), ``rfkit sample`` and
    ``rfkit reflow``: a command's options override it with :meth:`override`, and :meth:`record`
    is what they report.
    """

    solver: Solver
    num_steps: int
    shift: float = 1.0
    cfg_scale: float = 1.0

    def override(self, **values: Any) -> SamplingSettings:
        """These settings with the given values replaced; a value of None keeps the current one."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def kwargs(self) -> dict[str, Any]:
        """As keyword arguments of :func:`generate` and of an objective's ``sample``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def record(self) -> dict[str, Any]:
        """Plain data for reports and manifests: the solver as its constructor call."""
        return {**self.kwargs(), "solver": repr(self.solver)}


def guided_velocity(model: VelocityModel, cond: Cond, cfg_scale: float = 1.0) -> VelocityFn:
    """``v(x, t, r=None)`` for a fixed condition, with classifier-free guidance (Ho & Salimans 2022)::

        v = v(x, t, null) + s (v(x, t, cond) - v(x, t, null))

    ``s = 1`` (or no condition) is the plain conditional model and costs one evaluation; otherwise
    the conditional and null halves run as one doubled batch. ``r`` is the model's optional second
    time (an interval for jumping samplers, :mod:`rfkit.objectives`), passed through.
    """
    cond = dict(cond)
    if cfg_scale == 1.0 or not cond:
        return lambda x, t, r=None: model(x, t, cond) if r is None else model(x, t, cond, r)
    n = next(iter(cond.values())).shape[0]
    null = model.drop_condition(cond, torch.ones(n, dtype=torch.bool, device=next(iter(cond.values())).device))
    both = {k: torch.cat([cond[k], null[k]]) for k in cond}

    def v(x: Tensor, t: Tensor, r: Tensor | None = None) -> Tensor:
        args = (torch.cat([x, x]), torch.cat([t, t]), both) + (() if r is None else (torch.cat([r, r]),))
        v_cond, v_null = model(*args).chunk(2)
        return v_null + cfg_scale * (v_cond - v_null)

    return v


@torch.no_grad()
def generate(
    model: VelocityModel,
    x0: Tensor,
    cond: Cond | None = None,
    solver: Solver | None = None,
    num_steps: int = 32,
    shift: float = 1.0,
    cfg_scale: float = 1.0,
) -> Tensor:
    """Integrate ``dx/dt = v(x, t)`` from noise ``x0`` (B, *shape) at t = 0 to samples at t = 1.

    Args:
        model: the velocity network.
        x0: starting noise.
        cond: conditioning, batch-first like ``x0``.
        solver: the integrator (default :class:`rfkit.solvers.Euler`).
        num_steps: solver steps; NFE = ``solver.nfe(num_steps)`` (doubled under guidance).
        shift: inference-side timestep shift of :func:`rfkit.solvers.time_grid`.
        cfg_scale: classifier-free guidance scale ``s``.
    """
    solver = solver if solver is not None else Euler()
    grid = time_grid(num_steps, shift, device=x0.device)
    return solver(guided_velocity(model, cond or {}, cfg_scale), x0, grid)
