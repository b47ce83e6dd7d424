"""Training objectives: what the network learns from a batch, and how the trained network samples.

Convention (docs/design.md §1): ``t = 0`` is noise ``x0``, ``t = 1`` is data ``x1``,
``z_t = (1 - t) x0 + t x1``, conditional velocity ``v = x1 - x0``. An objective receives the model,
the batch, the step's draws and the run's other axes (coupling, timestep sampler), and returns the
per-sample loss (B,) and the timesteps (B,) it used, which the module weights (``w(t)``) and bins
into the per-t curves. It also says how a model it trained generates (:meth:`Objective.sample`) and
at what cost (:meth:`Objective.nfe`).

* :class:`FlowMatching`: the rectified-flow velocity loss ``||v_theta(z_t, t) - v||^2``.
* :class:`MeanFlow`: the average velocity over an interval, for one- and few-step jumps (Geng et al. 2025).
* :class:`Shortcut`: the slope of a step of size d, self-consistent across step sizes (Frans et al. 2024).

MeanFlow and Shortcut feed the models' second time input ``r`` (``VelocityModel.forward(x, t, cond, r)``)
with an interval *length* (``r - t`` or the step size d), so ``r = 0`` (or None) is the instantaneous
velocity in both: a flow-matching network, whose second-time embedding starts at zero, is a valid
starting point for either, and generic code that asks for ``v(x, t)`` (diagnostics, guidance) gets it.
"""

from __future__ import annotations

import contextlib
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from rfkit.couplings import Coupling
from rfkit.draws import RowDraws
from rfkit.models.base import Cond, VelocityModel
from rfkit.paths import expand_t, straight_path
from rfkit.plugin import Plugin
from rfkit.sampling import generate, guided_velocity
from rfkit.solvers import Euler, Solver, time_grid
from rfkit.timesteps import TimestepSampler

__all__ = ["FlowMatching", "MeanFlow", "Objective", "Pairs", "Shortcut", "draw_pairs"]


@dataclass
class Pairs:
    """One step's training pairs: noise ``x0`` and data ``x1`` (B, *shape), times ``t`` (B,), the
    condition the model sees (after classifier-free-guidance dropout) and ``kept`` (B,) bool, the rows
    that kept their condition (None for an unconditional batch)."""

    x0: Tensor
    x1: Tensor
    t: Tensor
    cond: dict[str, Tensor]
    kept: Tensor | None = None


def draw_pairs(
    model: VelocityModel,
    batch: dict[str, Tensor],
    draws: RowDraws,
    coupling: Coupling,
    timesteps: TimestepSampler,
    cond_dropout: float = 0.0,
    t: Tensor | None = None,
) -> Pairs:
    """The draws every objective starts from, in a fixed order (noise, coupling, t, label drops), so
    a given (seed, step, row) gives the same pairs whichever objective trains on them.

    ``t`` given (validation levels) skips the timestep draw; ``cond_dropout`` is the probability of
    replacing a row's condition by the null condition (0 outside training).
    """
    # the conditioning keys' one home is the batch schema; imported here because importing the rfkit.data
    # package loads its Lightning data modules, which this module's import must not (tests/test_layering.py)
    from rfkit.data.schema import COND_KEYS

    x1 = batch["latent"]
    cond = {k: batch[k] for k in COND_KEYS if k in batch}
    x0 = draws.normal(tuple(x1.shape[1:]), x1.dtype).to(x1.device)
    x0, x1 = coupling(x0, x1, noise=batch.get("noise"), generator=draws.shared(), cond=cond)
    if t is None:
        sampler = timesteps.for_tokens(model.num_tokens(tuple(x1.shape[1:])))
        t = draws.rows(lambda k, g: sampler(k, device=draws.device, generator=g)).to(x1.device)
    kept = torch.ones(x1.shape[0], dtype=torch.bool, device=x1.device) if cond else None
    if cond_dropout > 0 and cond:
        drop = draws.uniform().to(x1.device) < cond_dropout
        cond, kept = model.drop_condition(cond, drop), ~drop
    return Pairs(x0, x1, t, cond, kept)


def squared_error(pred: Tensor, target: Tensor) -> Tensor:
    """(B, *shape) -> (B,) ``mean ||pred - target||^2`` over the latent dimensions, in fp32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


class Objective(Plugin, ABC):
    """A training loss and the sampler that goes with it.

    ``needs_second_time``: the objective feeds ``r`` to the model, which must accept it
    (``model.second_time``).
    """

    needs_second_time: bool = False

    def setup(
        self,
        model: VelocityModel,
        *,
        sharded: bool = False,
        activation_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        """Refuse, at the start of a run, what this objective cannot train: raise ValueError saying why
        and what to change. The flags say how the module transforms the model: sharded with FSDP2,
        blocks recomputed in backward, blocks compiled (:func:`rfkit.parallel.parallelize`)."""
        if self.needs_second_time and not getattr(model, "second_time", False):
            raise ValueError(
                f"{self!r} conditions the model on a second time (interval length), and "
                f"{type(model).__name__} was built without it: set model.model.init_args.second_time: true"
            )

    @abstractmethod
    def loss(
        self,
        model: VelocityModel,
        batch: dict[str, Tensor],
        draws: RowDraws,
        *,
        coupling: Coupling,
        timesteps: TimestepSampler,
        cond_dropout: float = 0.0,
        t: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-sample loss (B,) (before the run's weighting ``w(t)``) and the timesteps (B,) it used.

        Args:
            model: the network; call it as ``model(x, t, cond, r)``.
            batch: ``latent`` (B, *shape), optional ``noise`` (reflow pairs) and conditioning keys.
            draws: the step's random numbers: draw only from them (start with :func:`draw_pairs`).
            coupling, timesteps: the run's axes.
            cond_dropout: label-drop probability (0 outside training).
            t: fixed timesteps (validation): return the deterministic instantaneous-velocity loss at
                these t (``r = 0``), which needs no extra draws and compares across objectives.
        """

    def sample(
        self,
        model: VelocityModel,
        x0: Tensor,
        cond: Cond | None = None,
        *,
        solver: Solver | None = None,
        num_steps: int = 32,
        shift: float = 1.0,
        cfg_scale: float = 1.0,
    ) -> Tensor:
        """Samples from noise ``x0`` (B, *shape) at t = 0; default: integrate the velocity with ``solver``."""
        return generate(model, x0, cond, solver=solver, num_steps=num_steps, shift=shift, cfg_scale=cfg_scale)

    def nfe(self, solver: Solver | None, num_steps: int) -> int:
        """Network evaluations :meth:`sample` spends per sample (without guidance's doubling)."""
        return (solver if solver is not None else Euler()).nfe(num_steps)

    def bind_ema(self, swapped: Callable[[], AbstractContextManager] | None) -> None:
        """Called at fit start with a context factory in which the model holds its EMA weights
        (``EMA.swapped``, :mod:`rfkit.ema`), or None when the run keeps no EMA. Default: unused."""


def instantaneous_loss(model: VelocityModel, pairs: Pairs, r: Tensor | None = None) -> Tensor:
    """(B,) ``mean ||model(z_t, t, cond, r) - (x1 - x0)||^2``: flow matching, and the r = 0 rows of the others."""
    path = straight_path(pairs.x0, pairs.x1, pairs.t)
    v = model(path.x_t, pairs.t, pairs.cond) if r is None else model(path.x_t, pairs.t, pairs.cond, r)
    return squared_error(v, path.u)


class FlowMatching(Objective):
    """Rectified flow / conditional flow matching (Liu et al. 2022; Lipman et al. 2023)::

        loss_i = mean ||v_theta(z_t, t, cond) - (x1 - x0)||^2,   z_t = (1 - t) x0 + t x1

    Samples by integrating ``dz/dt = v_theta`` with the run's solver. Composes with every coupling,
    timestep sampler and weighting.
    """

    def loss(self, model, batch, draws, *, coupling, timesteps, cond_dropout=0.0, t=None):
        pairs = draw_pairs(model, batch, draws, coupling, timesteps, cond_dropout, t)
        return instantaneous_loss(model, pairs), pairs.t


# --------------------------------------------------------------------------------------------
# Jumps: the average velocity over an interval
# --------------------------------------------------------------------------------------------


def jump(
    model: VelocityModel,
    x0: Tensor,
    cond: Cond | None,
    num_steps: int,
    shift: float = 1.0,
    cfg_scale: float = 1.0,
    step_input: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``num_steps`` jumps on the grid ``t_0 = 0 < ... < t_K = 1``: ``z += h f(z, t_k, h)`` with the interval
    ``h = t_{k+1} - t_k`` (through ``step_input``, if given) as the model's second time; K network
    evaluations (2K under guidance)."""
    velocity = guided_velocity(model, cond or {}, cfg_scale)
    grid = time_grid(num_steps, shift, device=x0.device)
    z, n = x0, x0.shape[0]
    for t0, t1 in itertools.pairwise(grid):
        h = (t1 - t0).expand(n)
        z = z + expand_t(h, z) * velocity(z, t0.expand(n), h if step_input is None else step_input(h))
    return z


def refuse_dropout(objective: Objective, model: nn.Module) -> None:
    """Two evaluations of one network (a JVP's primal and tangent, or a target and a prediction) must
    see one function: dropout would draw two masks."""
    active = [name for name, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if active:
        raise ValueError(
            f"{objective!r} differentiates / evaluates the model more than once per sample and cannot align "
            f"dropout masks across them; set dropout to 0 in {active[:3]}"
        )


class MeanFlow(Objective):
    """MeanFlow (Geng et al. 2025): learn the *average* velocity over an interval, and jump with it.

    **In rfkit's direction** (t = 0 noise, t = 1 data; the paper counts the other way, which only
    renames the ends). Along the ODE trajectory ``dz_s/ds = v(z_s, s)`` through ``z_t``, the
    average velocity from ``t`` forward to ``r >= t`` is::

        u(z_t, r, t) = 1 / (r - t) * int_t^r v(z_s, s) ds,     so   z_r = z_t + (r - t) u(z_t, r, t)

    Multiply out, ``(r - t) u = int_t^r v ds``, and differentiate in ``t`` with ``r`` fixed (the lower
    limit moves, and z_t moves along the trajectory)::

        -u + (r - t) du/dt = -v(z_t, t)    =>    u = v - (t - r) du/dt,
        du/dt = v . d_z u + d_t u         (the total derivative along the flow)

    (the paper's identity, with the same signs: it holds whichever end is noise). The training target
    replaces v by the conditional velocity ``x1 - x0`` and stops its gradient::

        u_tgt = (x1 - x0) + (r - t) sg(du/dt),     loss = sg(w) ||u_theta(z_t, r, t) - u_tgt||^2

    The network sees ``(z, t, h = r - t)``: ``f(z, t, h) = u(z, t + h, t)``, so ``du/dt`` is the JVP of
    f along the tangent ``(dz, dt, dh) = (x1 - x0, 1, -1)``, one forward-mode pass
    (``torch.func.jvp``). At ``h = 0``, ``u = v``: the rows with r = t are plain flow matching.

    **Forward mode.** The JVP runs on the math SDPA kernel (flash and memory-efficient attention
    have no forward-mode derivative), in fp32 with autocast off (bf16 tangents are too coarse for a
    regression target), on the unwrapped model (``torch.func.jvp`` through a DDP wrapper skips its
    gradient synchronisation; rfkit's module calls the inner model, and DDP and FSDP2 runs train like
    one process on the global batch, tested on 2 ranks). Refused at start: active dropout (the primal
    and tangent passes would need one mask), activation checkpointing (its recomputation in backward
    drops the forward-mode tangents) and ``compile`` (not verified with the JVP).

    **Composition.** (r, t) are the sorted pair of two draws from the run's timestep sampler (the
    paper's best: LogitNormal(loc=-0.4, scale=1.0), in rfkit's sigma-side parameters, which are the
    paper's), with r set to t on a fraction ``1 - ratio`` of the rows. Couplings compose (they only
    pair noise with data); the run's weighting multiplies the adaptive weight below.

    Args:
        ratio: fraction of rows with r != t (paper: 0.25; 0 is flow matching).
        power: adaptive loss weight ``w = 1 / (delta + c)^p`` on the per-sample error ``delta``
            (mean over dimensions), stopped gradient (paper: p = 1; 0 is the plain squared error).
        eps: the ``c`` of the adaptive weight.
        guidance: classifier-free guidance folded into the target, ``omega`` (1 = none): on rows
            that keep their condition, ``v~ = omega v + kappa u(z,t,t|c) + (1 - omega - kappa) u(z,t,t|null)``
            replaces ``v`` (the paper's guided MeanFlow); sampling then needs one evaluation per
            step and no guidance of its own (set the run's ``cfg_scale: 1``).
        guidance_mix: ``kappa`` above (0: the plain folded guidance; the paper tunes omega and kappa
            per model).
    """

    needs_second_time = True

    def __init__(
        self,
        ratio: float = 0.25,
        power: float = 1.0,
        eps: float = 1e-3,
        guidance: float = 1.0,
        guidance_mix: float = 0.0,
    ) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio (the fraction of rows with r != t) must lie in [0, 1], got {ratio}")
        if not power >= 0 or not eps > 0:
            raise ValueError(
                f"power must be >= 0 and eps > 0 (adaptive weight 1/(delta + eps)^power), got {power}, {eps}"
            )
        if not guidance >= 0 or not 0 <= guidance_mix < 1:
            raise ValueError(f"guidance must be >= 0 and guidance_mix in [0, 1), got {guidance}, {guidance_mix}")
        self.ratio = ratio
        self.power = power
        self.eps = eps
        self.guidance = guidance
        self.guidance_mix = guidance_mix

    def setup(self, model, *, sharded=False, activation_checkpointing=False, compile=False):
        super().setup(model, sharded=sharded)
        refuse_dropout(self, model)
        if activation_checkpointing or compile:
            raise ValueError(
                "MeanFlow's forward-mode JVP does not go through "
                + (
                    "activation checkpointing (its recomputation in backward runs without the forward-mode "
                    "tangents and fails)"
                    if activation_checkpointing
                    else "torch.compile (not verified with torch.func.jvp)"
                )
                + ": set model.activation_checkpointing: false and model.compile: false"
            )

    def draw_intervals(self, pairs: Pairs, draws: RowDraws, timesteps: TimestepSampler, model) -> Tensor:
        """(B,) ``h = r - t >= 0`` (0 on a fraction 1 - ratio of rows); moves ``pairs.t`` to the interval's start."""
        sampler = timesteps.for_tokens(model.num_tokens(tuple(pairs.x1.shape[1:])))
        other = draws.rows(lambda k, g: sampler(k, device=draws.device, generator=g)).to(pairs.t)
        jump = draws.uniform().to(pairs.t.device) < self.ratio
        start = torch.where(jump, torch.minimum(pairs.t, other), pairs.t)
        end = torch.where(jump, torch.maximum(pairs.t, other), pairs.t)
        pairs.t = start
        return end - start

    def guided_target_velocity(self, model: VelocityModel, pairs: Pairs, z: Tensor) -> Tensor:
        """The velocity the target uses: ``x1 - x0``, with guidance folded in on the rows that kept their
        condition (the dropped rows learn the unconditional average velocity, which guidance needs)."""
        v = pairs.x1 - pairs.x0
        if (self.guidance == 1.0 and self.guidance_mix == 0.0) or pairs.kept is None:
            return v
        n = v.shape[0]
        zero = torch.zeros(n, device=v.device, dtype=pairs.t.dtype)
        with torch.no_grad():
            null = model.drop_condition(pairs.cond, torch.ones(n, dtype=torch.bool, device=v.device))
            u_null = model(z, pairs.t, null, zero).to(v.dtype)
            u_cond = model(z, pairs.t, pairs.cond, zero).to(v.dtype) if self.guidance_mix else 0.0
        guided = self.guidance * v + self.guidance_mix * u_cond + (1 - self.guidance - self.guidance_mix) * u_null
        return torch.where(pairs.kept.reshape(-1, *[1] * (v.ndim - 1)), guided, v)

    def target(self, model: VelocityModel, z: Tensor, t: Tensor, h: Tensor, v: Tensor, cond: Cond) -> tuple:
        """``(u_theta(z, t + h, t), u_tgt)``, both (B, *shape): the prediction (with gradient) and
        ``v + h du/dt`` (without), from one JVP on the math attention kernel, in fp32."""

        def f(z_: Tensor, t_: Tensor, h_: Tensor) -> Tensor:
            return model(z_, t_, cond, h_)

        dtype = torch.promote_types(z.dtype, torch.float32)  # at least fp32, whatever autocast or the data say
        z, v, t, h = z.to(dtype), v.to(dtype), t.to(dtype), h.to(dtype)
        ones = torch.ones_like(t)
        with sdpa_kernel(SDPBackend.MATH), torch.autocast(z.device.type, enabled=False):
            u, dudt = torch.func.jvp(f, (z, t, h), (v, ones, -ones))
        return u, (v + expand_t(h, v) * dudt).detach()

    def loss(self, model, batch, draws, *, coupling, timesteps, cond_dropout=0.0, t=None):
        if t is not None:  # validation: the instantaneous velocity at fixed t (u(z, t, t) = v)
            pairs = draw_pairs(model, batch, draws, coupling, timesteps, 0.0, t)
            return instantaneous_loss(model, pairs, torch.zeros_like(pairs.t)), pairs.t
        pairs = draw_pairs(model, batch, draws, coupling, timesteps, cond_dropout, None)
        h = self.draw_intervals(pairs, draws, timesteps, model)
        z = straight_path(pairs.x0, pairs.x1, pairs.t).x_t
        v = self.guided_target_velocity(model, pairs, z)
        u, target = self.target(model, z, pairs.t, h, v, pairs.cond)
        delta = squared_error(u, target)
        weight = (delta.detach() + self.eps).pow(-self.power) if self.power else torch.ones_like(delta)
        return weight * delta, pairs.t

    def sample(self, model, x0, cond=None, *, solver=None, num_steps=1, shift=1.0, cfg_scale=1.0):
        """``num_steps`` jumps with the average velocity (``solver`` is ignored: a jump is exact for u)."""
        return jump(model, x0, cond, num_steps, shift, cfg_scale)

    def nfe(self, solver, num_steps):
        return num_steps


# --------------------------------------------------------------------------------------------
# Shortcut models: the velocity of a step of size d, consistent across step sizes
# --------------------------------------------------------------------------------------------


class Shortcut(Objective):
    """Shortcut models (Frans et al. 2024): one network for every step size d, trained to be consistent.

    The network ``s(z_t, t, d)`` (the second time is the step size d) is the displacement per unit
    time of a step of size d, so ``z_{t+d} = z_t + d s(z_t, t, d)``. Two targets (the paper's
    convention is rfkit's: t = 0 noise, t = 1 data)::

        d = 0 (flow matching):      s(z_t, t, 0)  <- x1 - x0
        d = 2 delta (consistency):  s(z_t, t, 2 delta) <- sg(s1 + s2) / 2,
            s1 = s(z_t, t, delta),  s2 = s(z_t + delta s1, t + delta, delta)

    i.e. one step of 2 delta lands where two steps of delta do. A fraction ``fraction`` of the rows
    (the paper: 1/4) trains consistency at a full step ``2 delta = 2^-j``, j uniform in
    ``0 .. levels - 1``, from t on that step's grid ``{0, 2 delta, ..} < 1``; the finest half step
    ``2^-levels`` is taken with d = 0 (the flow-matching velocity grounds the recursion, as the
    paper's code does with its smallest step). The other rows are flow matching at t from the run's
    timestep sampler. Sampling takes K equal steps with d = 1/K (K = 1, 2, 4, .. up to 2^(levels-1)
    were trained). Couplings compose; the run's weighting multiplies each row's loss by w(t).

    Args:
        fraction: share of rows with a consistency target.
        levels: log2 of the number of finest steps (paper: 7, steps down to 1/128).
        targets: ``"current"``: the consistency targets from the model being trained (no gradient);
            ``"ema"``: from its exponential moving average (the paper's choice), which needs
            :class:`rfkit.ema.EMA` in the trainer's callbacks (the targets run inside ``EMA.swapped``).
    """

    needs_second_time = True

    def __init__(self, fraction: float = 0.25, levels: int = 7, targets: Literal["current", "ema"] = "current") -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(
                f"fraction (the share of rows with a consistency target) must lie in [0, 1], got {fraction}"
            )
        if not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels must be an int >= 1 (finest step 2^-levels), got {levels!r}")
        if targets not in ("current", "ema"):
            raise ValueError(f"targets must be 'current' or 'ema', got {targets!r}")
        self.fraction = fraction
        self.levels = levels
        self.targets = targets
        self.target_weights: Callable[[], AbstractContextManager] = contextlib.nullcontext
        """A context in which the model holds the weights the targets come from (set by :meth:`bind_ema`)."""

    def bind_ema(self, swapped):
        if self.targets != "ema":
            return
        if swapped is None:
            raise ValueError(
                "Shortcut(targets='ema') takes its consistency targets from the EMA weights, and this run keeps "
                "no EMA: add rfkit.ema.EMA to trainer.callbacks, or use targets: current"
            )
        self.target_weights = swapped

    def step_input(self, d: Tensor) -> Tensor:
        """The network's second input for step size d: 0 at (and below) the finest step, which is the velocity."""
        return torch.where(d <= 2.0**-self.levels, torch.zeros_like(d), d)

    @torch.no_grad()
    def consistency_target(self, model: VelocityModel, z: Tensor, t: Tensor, half: Tensor, cond: Cond) -> Tensor:
        """(B, *shape) ``(s1 + s2) / 2``: the slope of two half steps of size ``half`` (B,) from ``z`` at ``t``."""
        d = self.step_input(half)
        with self.target_weights():
            s1 = model(z, t, cond, d)
            s2 = model(z + expand_t(half, z) * s1, t + half, cond, d)
        return (s1 + s2) / 2

    def loss(self, model, batch, draws, *, coupling, timesteps, cond_dropout=0.0, t=None):
        if t is not None:  # validation: the instantaneous velocity at fixed t
            pairs = draw_pairs(model, batch, draws, coupling, timesteps, 0.0, t)
            return instantaneous_loss(model, pairs, torch.zeros_like(pairs.t)), pairs.t
        pairs = draw_pairs(model, batch, draws, coupling, timesteps, cond_dropout, None)
        device = pairs.t.device
        consistent = draws.uniform().to(device) < self.fraction
        level = draws.rows(lambda k, g: torch.randint(0, self.levels, (k,), generator=g, device=draws.device))
        full = 0.5 ** level.to(device=device, dtype=pairs.t.dtype)  # 2 delta = 2^-j
        start = torch.floor(draws.uniform().to(device) / full) * full  # on the grid of the full step, < 1
        t = torch.where(consistent, start, pairs.t)
        d = torch.where(consistent, full, torch.zeros_like(full))
        path = straight_path(pairs.x0, pairs.x1, t)
        target = path.u.clone()
        rows = consistent.nonzero().squeeze(1)  # run even when empty: under FSDP2 every rank must do the same passes
        cond = {k: v[rows] for k, v in pairs.cond.items()}
        target[rows] = self.consistency_target(model, path.x_t[rows], t[rows], full[rows] / 2, cond).to(target)
        return squared_error(model(path.x_t, t, pairs.cond, self.step_input(d)), target), t

    def sample(self, model, x0, cond=None, *, solver=None, num_steps=1, shift=1.0, cfg_scale=1.0):
        """``num_steps`` steps with ``d = 1/num_steps`` (with ``shift``, the shifted grid's step sizes)."""
        return jump(model, x0, cond, num_steps, shift, cfg_scale, step_input=self.step_input)

    def nfe(self, solver, num_steps):
        return num_steps
