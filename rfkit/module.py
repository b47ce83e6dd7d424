"""RectifiedFlow: the LightningModule. Wiring and logging only; the math lives in the core modules.

One training step, in the convention of docs/design.md §1, with the default objective
(:class:`rfkit.objectives.FlowMatching`; MeanFlow and Shortcut are the others)::

    x1 = batch latents;  x0 ~ N(0, I);  (x0, x1) = coupling(x0, x1, cond=...)
    t ~ timesteps;  x_t = (1 - t) x0 + t x1;  u = x1 - x0
    loss = mean_i  w(t_i) * loss_i,   loss_i = objective's per-sample loss (here mean ||v(x_t, t, cond) - u||^2)
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from typing_extensions import override

from rfkit import __version__
from rfkit.couplings import Coupling, Independent
from rfkit.data.schema import COND_KEYS
from rfkit.distributed import any_rank, broadcast_from_zero, rank_and_world
from rfkit.draws import RowDraws
from rfkit.ema import find_ema
from rfkit.metrics import LossMeter
from rfkit.models.base import VelocityModel
from rfkit.objectives import FlowMatching, Objective
from rfkit.parallel import parallelize
from rfkit.resume import NonFiniteLossError
from rfkit.sampling import SamplingSettings
from rfkit.solvers import Euler, Solver
from rfkit.strategies import sharding_mesh
from rfkit.timesteps import TimestepSampler, Uniform
from rfkit.weightings import Constant, LossWeighting

__all__ = ["COND_KEYS", "RectifiedFlow"]

_COMPONENTS = [
    "model", "objective", "timesteps", "coupling", "weighting", "optimizer", "lr_scheduler", "sample_solver"
]  # fmt: skip


def built_from_parsed_config() -> bool:
    """True while LightningCLI builds a module from a parsed config (and hands over the config as plain
    data, which a checkpoint can rebuild from); False for a module built in Python.

    The one place rfkit reads a private Lightning name (``_given_hyperparameters``, the context
    variable LightningCLI sets around instantiation); tests/test_module.py checks both answers, so a
    Lightning release that moves it fails there, not in users' checkpoints.
    """
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    return _given_hyperparameters.get() is not None


class RectifiedFlow(pl.LightningModule):
    """Trains a velocity model on the straight path between noise and data.

    Args:
        model: the velocity network ``v(x, t, cond)``.
        objective: the training loss and the sampler that goes with it (default ``FlowMatching()``;
            ``MeanFlow()`` and ``Shortcut()`` learn one- and few-step jumps, :mod:`rfkit.objectives`).
        timesteps: where on the path to train (default ``Uniform()``).
        coupling: which noise each data sample travels from (default ``Independent()``).
        weighting: per-sample loss weight ``w(t)`` (default ``Constant()``).
        optimizer: builds the optimizer from the parameters (default AdamW).
        lr_scheduler: builds a scheduler from the optimizer, stepped every optimizer step.
        cond_dropout: probability of replacing a sample's condition by the null condition, which
            trains the unconditional model that classifier-free guidance needs.
        sample_solver: ODE solver for validation samples (default ``Euler()``; jumping objectives ignore it).
        sample_steps: solver steps (jumps, for MeanFlow / Shortcut) for validation samples.
        sample_shift: inference-side timestep shift for validation samples.
        cfg_scale: guidance scale for validation samples (1 = none).
        loss_bins: number of t-bins in the logged per-t loss.
        val_levels: fixed t-levels of the validation loss; with fixed noise, two evaluations of
            one checkpoint give the same number.
        activation_checkpointing: recompute each transformer block in backward instead of keeping
            its activations (see :func:`rfkit.parallel.parallelize`).
        compile: ``torch.compile`` each transformer block.
        skip_nonfinite: on a NaN/inf loss, skip that optimizer step (on every rank) and count it in
            ``train/skipped_steps``, instead of stopping with :class:`NonFiniteLossError`.

    Training noise, timesteps and label drops are drawn per row of the *global* batch, from
    (seed, step, row) (:class:`rfkit.draws.RowDraws`): each rank draws only the blocks of rows it
    holds, yet gets the numbers any other layout would give those rows. So they are independent
    across ranks, the same for any number of ranks and any gradient accumulation (1 GPU with batch
    2B trains exactly like 2 GPUs with B each), and need no RNG state to resume.
    """

    def __init__(
        self,
        model: VelocityModel,
        objective: Objective | None = None,
        timesteps: TimestepSampler | None = None,
        coupling: Coupling | None = None,
        weighting: LossWeighting | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        cond_dropout: float = 0.0,
        sample_solver: Solver | None = None,
        sample_steps: int = 32,
        sample_shift: float = 1.0,
        cfg_scale: float = 1.0,
        loss_bins: int = 10,
        val_levels: int = 8,
        activation_checkpointing: bool = False,
        compile: bool = False,
        skip_nonfinite: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= cond_dropout < 1.0:
            raise ValueError(f"model.cond_dropout must lie in [0, 1), got {cond_dropout}")
        if not sample_shift > 0:
            raise ValueError(f"model.sample_shift must be > 0 (1 means no shift), got {sample_shift}")
        # Under `rfkit fit` Lightning hands us the parsed config as plain data (class_path + init_args),
        # which is what a checkpoint needs to rebuild this module. Built in Python, the components are
        # objects, so only the scalars are recorded.
        self.save_hyperparameters(ignore=None if built_from_parsed_config() else _COMPONENTS)
        self.model = model
        self.objective = objective if objective is not None else FlowMatching()
        self.timesteps = timesteps if timesteps is not None else Uniform()
        self.coupling = coupling if coupling is not None else Independent()
        self.weighting = weighting if weighting is not None else Constant()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.cond_dropout = cond_dropout
        self.sample_solver = sample_solver if sample_solver is not None else Euler()
        self.sample_steps = sample_steps
        self.sample_shift = sample_shift
        self.cfg_scale = cfg_scale
        self.val_levels = val_levels
        self.activation_checkpointing = activation_checkpointing
        self.compile_blocks = compile
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0
        self._skip_step = False
        self.noise_seed: int | None = None  # set at fit start (or from the checkpoint); see the class docstring
        self._draws_step = -1  # the optimizer step whose micro-batches are being counted
        self._micro_batch = 0  # which micro-batch of that step is running
        self._configured = False
        self.run_config: dict[str, Any] | None = None  # the whole resolved config, set by the CLI
        self.loss_meter = LossMeter(loss_bins)
        self.last_loss_by_t: Tensor | None = None  # the latest flushed per-t curve, for callbacks
        self._grad_norm: Tensor | None = None
        self._flushed_at = -1

    def __deepcopy__(self, memo: dict) -> RectifiedFlow:
        # The optimizer factories LightningCLI builds reference the CLI, hence the trainer and, under DDP,
        # its locks, which cannot be copied. A copy (EMAWeightAveraging makes one) shares them instead.
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        memo.update({id(f): f for f in (self.optimizer_factory, self.lr_scheduler_factory)})
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    # ------------------------------------------------------------------ training

    @override
    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], r: Tensor | None = None) -> Tensor:
        return self.model(x, t, cond) if r is None else self.model(x, t, cond, r)

    def velocity_loss(self, batch: dict[str, Tensor], draws: RowDraws | None = None, t: Tensor | None = None) -> tuple:
        """The objective's per-sample loss (B,), before the weighting, and the timesteps (B,) used.

        ``draws``: the step's random numbers (default: seeded from torch's global RNG). ``t``: fixed
        timesteps (validation levels): the instantaneous-velocity loss there, for every objective.
        """
        x1 = batch["latent"]
        draws = draws if draws is not None else RowDraws.from_torch_rng(x1.shape[0], x1.device)
        return self.objective.loss(
            self.model,
            batch,
            draws,
            coupling=self.coupling,
            timesteps=self.timesteps,
            cond_dropout=self.cond_dropout if self.training else 0.0,
            t=t,
        )

    def _training_draws(self, num_rows: int) -> RowDraws:
        """This step's draws for this rank's rows (see the class docstring); from the global RNG when
        called by hand, without a trainer."""
        if self._trainer is None:
            return RowDraws.from_torch_rng(num_rows, self.device)
        rank, world = rank_and_world()
        step = self.trainer.global_step
        self._micro_batch = self._micro_batch + 1 if step == self._draws_step else 0  # under gradient accumulation
        self._draws_step = step
        return RowDraws.for_step(self.noise_seed or 0, step, self._micro_batch, rank, world, num_rows, self.device)

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        per_sample, t = self.velocity_loss(batch, self._training_draws(batch["latent"].shape[0]))
        loss = (self.weighting(t) * per_sample).mean()
        if any_rank(~torch.isfinite(loss.detach()), loss.device):  # one all-reduce: every rank decides alike
            if not self.skip_nonfinite:
                raise NonFiniteLossError.at(self._trainer)
            self._skip_step = True
            return loss  # its backward keeps the ranks' collectives in step; the update is dropped
        # accumulate only; values are all-reduced and logged every log_every_n_steps (logging every
        # step costs about a millisecond, more than a small model's step)
        self.loss_meter.update(loss, t, per_sample)
        return loss

    def _flush_step(self) -> bool:
        every = self.trainer.log_every_n_steps
        step = self.trainer.global_step
        return every > 0 and step > 0 and step % every == 0 and step != self._flushed_at

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._skip_step:  # no gradient, no update: AdamW leaves moments and weights untouched
            self._skip_step, self.skipped_steps = False, self.skipped_steps + 1
            for p in self.parameters():
                p.grad = None
            return
        every = self.trainer.log_every_n_steps
        if every > 0 and (self.trainer.global_step + 1) % every == 0:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else None
            # FSDP2 grads are DTensor shards; their norm comes back as a DTensor: take the full value
            self._grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._flush_step():
            return
        self._flushed_at = self.trainer.global_step
        mean_loss, self.last_loss_by_t = self.loss_meter.read(self._sum_over_ranks)
        metrics = {"train/loss": mean_loss}
        edges = self.loss_meter.edges()
        for i, value in enumerate(self.last_loss_by_t.tolist()):
            if value == value:  # skip empty bins (NaN)
                metrics[f"train/loss_t/{edges[i]:.2f}-{edges[i + 1]:.2f}"] = value
        if self._grad_norm is not None:
            metrics["train/grad_norm"] = self._grad_norm
        if self.skip_nonfinite:
            metrics["train/skipped_steps"] = self.skipped_steps
        for i, group in enumerate(self.trainer.optimizers[0].param_groups):
            metrics[f"train/lr{'' if i == 0 else i}"] = group["lr"]
        values = {k: float(v) for k, v in metrics.items()}
        for logger in self.loggers:
            logger.log_metrics(values, step=self.trainer.global_step)
        self.log("train/loss", values["train/loss"], prog_bar=True, logger=False)

    def _sum_over_ranks(self, x: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(x, reduce_op="sum") if self.trainer.world_size > 1 else x

    # ------------------------------------------------------------------ validation

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        n = batch["latent"].shape[0]
        # fixed noise and t-levels (t_k = (k + 1/2) / K, sample i at level i mod K): deterministic
        draws = RowDraws.for_step(1234, batch_idx, 0, *rank_and_world(), n, self.device)
        levels = (torch.arange(n, device=self.device) % self.val_levels + 0.5) / self.val_levels
        per_sample, _t = self.velocity_loss(batch, draws, t=levels.to(batch["latent"].dtype))
        self.log("val/loss", per_sample.mean(), on_epoch=True, sync_dist=True, batch_size=n, prog_bar=True)
        for k in range(min(self.val_levels, n)):
            at_level = per_sample[k :: self.val_levels]
            name = f"val/loss_t/{(k + 0.5) / self.val_levels:.3f}"
            self.log(name, at_level.mean(), on_epoch=True, sync_dist=True, batch_size=at_level.numel())

    @property
    def sampling(self) -> SamplingSettings:
        """This module's sampling settings (``sample_solver``, ``sample_steps``, ``sample_shift``, ``cfg_scale``)."""
        return SamplingSettings(self.sample_solver, self.sample_steps, self.sample_shift, self.cfg_scale)

    @torch.no_grad()
    def sample(
        self, x0: Tensor, cond: dict[str, Tensor] | None = None, num_steps: int | None = None, **kw: Any
    ) -> Tensor:
        """Samples from noise ``x0`` with the objective's sampler and :attr:`sampling`, overridden by
        keyword (``solver``, ``num_steps``, ``shift``, ``cfg_scale``); :meth:`nfe` says what it costs."""
        settings = self.sampling.override(num_steps=num_steps, **kw)
        return self.objective.sample(self.model, x0, cond, **settings.kwargs())

    def nfe(self, num_steps: int | None = None, conditional: bool = False, **kw: Any) -> int:
        """Network evaluations per sample of :meth:`sample` with these settings (doubled by guidance)."""
        settings = self.sampling.override(num_steps=num_steps, **kw)
        nfe = self.objective.nfe(settings.solver, settings.num_steps)
        return nfe * (2 if conditional and settings.cfg_scale != 1.0 else 1)

    # ------------------------------------------------------------------ optimisation & checkpoints

    @override
    def configure_model(self) -> None:
        """Activation checkpointing, compile and (under ``ModelParallelStrategy``) FSDP2, per block.

        Lightning may call this twice (``WeightAveraging.setup`` does); only the first call acts.
        """
        if self._configured:
            return
        self._configured = True
        mesh = sharding_mesh(self)
        # the objective refuses what it cannot train, before any step
        self.objective.setup(
            self.model,
            sharded=mesh is not None,
            activation_checkpointing=self.activation_checkpointing,
            compile=self.compile_blocks,
        )
        parallelize(self.model, mesh, self.activation_checkpointing, self.compile_blocks)

    @override
    def configure_optimizers(self) -> Any:
        # trainable parameters only: under LoRA the frozen base gets no optimizer state
        optimizer = self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def on_fit_start(self) -> None:
        ema = find_ema(self._trainer)  # objectives that read the EMA weights (Shortcut(targets='ema')) get them
        self.objective.bind_ema((lambda: ema.swapped(self)) if ema is not None else None)
        if self.noise_seed is None:  # seed_everything's seed; one value on every rank
            seed = torch.tensor([torch.initial_seed() % 2**62], device=self.device)
            self.noise_seed = int(broadcast_from_zero(seed).item())

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rfkit"] = {
            "version": __version__,
            "config": self.run_config,
            "noise_seed": self.noise_seed,
            "skipped_steps": self.skipped_steps,
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("rfkit", {})
        self.noise_seed = saved.get("noise_seed", self.noise_seed)
        self.skipped_steps = saved.get("skipped_steps", 0)
