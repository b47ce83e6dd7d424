"""EMA of the trainable weights, sharded like them: one path for one process, DDP and FSDP2.

After every ``update_every``-th optimizer step from ``start_step`` on, for every parameter ``p``
with ``requires_grad`` (under LoRA: the adapters only)::

    first update:  a = p
    later:         a = decay * a + (1 - decay) * p

Each average ``a`` is a tensor like its parameter: a plain tensor on one process or under DDP, a
DTensor with the parameter's placements under FSDP2, updated with local ops (no communication).

Where it lives in a checkpoint: in ``checkpoint["state_dict"]`` under ``ema/<parameter name>``,
beside the trained weights. Under FSDP2 that dict is what Lightning writes as the sharded
(distributed) checkpoint, so the average is written and read shard by shard like the weights;
one file holds it just the same. :func:`rfkit.checkpoint.read_checkpoint` hands out
``state_dict`` with the averages put in (what ``rfkit sample``, ``load_checkpoint``,
``InitFromCheckpoint`` use) and the trained weights as ``current_model_state``, as Lightning's
``EMAWeightAveraging`` checkpoints hold them.

Differences from Lightning's ``EMAWeightAveraging`` (same ``decay``, same step rule:
update after step index ``i = global_step - 1`` when ``i >= start_step`` and ``i % update_every == 0``):

- buffers and frozen parameters are not averaged (Lightning averages buffers by default);
- the average is not copied into the model when training ends: the module keeps its trained
  weights; use ``with ema.swapped(module):`` or load the checkpoint for the EMA weights;
- the update is one in-place ``lerp`` (``a + (1 - decay) (p - a)``, as torch's
  ``get_ema_multi_avg_fn``; no temporary copy of the weights), where Lightning's ``get_ema_avg_fn``
  rounds ``decay * a`` and ``(1 - decay) * p`` apart: the two agree to float rounding.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import Tensor
from typing_extensions import override

__all__ = ["EMA", "PREFIX", "find_ema", "split_state_dict"]

PREFIX = "ema/"
"""Checkpoint ``state_dict`` keys of the averages: ``ema/<parameter name>`` ("/" is never in a module name)."""


def split_state_dict(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(trained weights, averages by parameter name) of a checkpoint's ``state_dict``."""
    live = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    return live, {k.removeprefix(PREFIX): v for k, v in state.items() if k.startswith(PREFIX)}


def find_ema(trainer: pl.Trainer | None) -> EMA | None:
    """The trainer's :class:`EMA` callback, or None."""
    callbacks = trainer.callbacks if trainer is not None else []
    return next((cb for cb in callbacks if isinstance(cb, EMA)), None)


def _local(t: Tensor) -> Tensor:
    """The tensor a rank holds: a DTensor's local shard (under no_grad the shard itself: writes reach
    the DTensor), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _reshard(module: torch.nn.Module) -> None:
    """Puts FSDP2's sharded parameters back in place (a no-grad forward may leave the root's gathered),
    so the next forward gathers the values written here."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class EMA(pl.Callback):
    """Exponential moving average of the trainable weights, used for validation, sampling and export.

    Validation runs with the averaged weights swapped in (as with Lightning's ``EMAWeightAveraging``);
    ``with ema.swapped(module):`` does the same anywhere else. The average is saved in and restored
    from every checkpoint (see the module docstring), so a resumed run continues it exactly.

    Args:
        decay: weight of the old average per update; the horizon is about ``1 / (1 - decay)`` updates.
        update_every: update after every N-th optimizer step (step indices divisible by N).
        start_step: first step index to update at; the first update copies the weights.
    """

    def __init__(self, decay: float = 0.999, update_every: int = 1, start_step: int = 0) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        if update_every < 1 or start_step < 0:
            raise ValueError(f"EMA update_every must be >= 1 and start_step >= 0, got {update_every}, {start_step}")
        self.decay = decay
        self.update_every = update_every
        self.start_step = start_step
        self.names: list[str] = []
        self.params: list[Tensor] = []  # the module's trainable parameters (FSDP2: the sharded DTensors)
        self.average: list[Tensor] | None = None  # one per parameter, shaped and placed like it
        self.updates = 0
        self.latest_update_step = 0
        self._loaded: dict[str, Tensor] = {}  # averages read from a checkpoint file before the model moved
        self._swapped = False

    # ------------------------------------------------------------------ the average

    def _ensure(self, pl_module: pl.LightningModule) -> list[Tensor]:
        """The averages, made on first use (after the strategy placed and sharded the model):
        a copy of the weights, or the averages a checkpoint file held."""
        if self.average is None:
            _reshard(pl_module)
            named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
            self.names, self.params = [n for n, _ in named], [p for _, p in named]
            self.average = [p.detach().clone() for p in self.params]
            if self._loaded:
                self._copy_in(self._loaded)
                self._loaded = {}
        return self.average

    def _copy_in(self, averages: dict[str, Tensor]) -> None:
        missing = [n for n in self.names if n not in averages]
        if missing:
            raise KeyError(f"the checkpoint holds no EMA average for {missing[:5]} ({len(missing)} in all)")
        with torch.no_grad():
            for name, a in zip(self.names, self.average, strict=True):
                a.copy_(averages[name])

    @torch.no_grad()
    def update(self, pl_module: pl.LightningModule) -> None:
        """One EMA update from the module's current weights (local ops; every rank its own shard)."""
        average = [_local(a) for a in self._ensure(pl_module)]
        if self._swapped:
            raise RuntimeError("EMA.update inside EMA.swapped: the module holds the average, not the trained weights")
        params = [_local(p.detach()) for p in self.params]
        if self.updates == 0:
            torch._foreach_copy_(average, params)
        else:  # a + (1 - decay) (p - a) = decay a + (1 - decay) p, in place
            torch._foreach_lerp_(average, params, 1 - self.decay)
        self.updates += 1

    def should_update(self, step_idx: int) -> bool:
        """Lightning's ``EMAWeightAveraging`` rule for the optimizer step of index ``step_idx`` (0-based)."""
        return step_idx >= self.start_step and step_idx % self.update_every == 0

    @torch.no_grad()
    def _exchange(self, pl_module: pl.LightningModule) -> None:
        """Swaps the weights' and the averages' values in place, one tensor at a time (bitwise, no comms)."""
        average = self._ensure(pl_module)
        _reshard(pl_module)
        largest = max((a.numel() for a in map(_local, average)), default=0)
        scratch = {}  # one buffer per dtype, of the largest tensor: no copy of the whole model
        for p, a in zip(self.params, average, strict=True):
            p_local, a_local = _local(p.detach()), _local(a)
            if p_local.dtype not in scratch:
                scratch[p_local.dtype] = torch.empty(largest, dtype=p_local.dtype, device=p_local.device)
            tmp = scratch[p_local.dtype][: p_local.numel()].view(p_local.shape)
            tmp.copy_(p_local)
            p_local.copy_(a_local)
            a_local.copy_(tmp)
        self._swapped = not self._swapped

    @contextmanager
    def swapped(self, pl_module: pl.LightningModule) -> Iterator[pl.LightningModule]:
        """``with ema.swapped(module):`` the module's trainable weights are the averages; restored after.

        Every rank must enter it under FSDP2 (the forward passes inside gather shards).
        """
        if self._swapped:  # already in (validation): nothing to do, nothing to undo
            yield pl_module
            return
        self._exchange(pl_module)
        try:
            yield pl_module
        finally:
            self._exchange(pl_module)

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, FSDPStrategy):
            raise ValueError(
                "rfkit.ema.EMA shards its average like FSDP2's DTensor parameters; Lightning's FSDP (FSDP1) "
                "flattens them: use strategy rfkit.strategies.FSDP2"
            )
        if isinstance(strategy, ModelParallelStrategy) and not strategy._save_distributed_checkpoint:
            raise ValueError(
                "rfkit.ema.EMA under FSDP2 saves its average shard by shard: set "
                "trainer.strategy.init_args.save_distributed_checkpoint=true"
            )

        # a checkpoint file's averages arrive with the model's state_dict, before the model is placed:
        # taken out here (strict loading would refuse them) and copied in once the averages exist
        def take_averages(module, state_dict, prefix, *args) -> None:
            for key in [k for k in state_dict if k.startswith(prefix + PREFIX)]:
                self._loaded[key.removeprefix(prefix + PREFIX)] = state_dict.pop(key)

        if not getattr(pl_module, "_rfkit_ema_hook", False):
            pl_module.register_load_state_dict_pre_hook(take_averages)
            pl_module._rfkit_ema_hook = True

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # global_step counts optimizer steps; under gradient accumulation this hook runs per micro-batch
        if trainer.global_step > self.latest_update_step and self.should_update(trainer.global_step - 1):
            self.update(pl_module)
            self.latest_update_step = trainer.global_step

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._swapped:
            self._exchange(pl_module)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._swapped:
            self._exchange(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_validation_epoch_end(trainer, pl_module)  # stopped mid-validation: the trained weights back

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "latest_update_step": self.latest_update_step}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates, self.latest_update_step = int(state["updates"]), int(state["latest_update_step"])

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        average, state = self._ensure(pl_module), checkpoint["state_dict"]
        for name, p, a in zip(self.names, self.params, average, strict=True):
            if self._swapped:  # saved mid-swap (SIGTERM in validation, or inside `swapped`): the values trade places
                state[name], state[PREFIX + name] = a.detach().clone(), p.detach().clone()
            else:
                state[PREFIX + name] = a

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        path = Path(trainer.ckpt_path) if trainer.ckpt_path is not None else None
        if path is None or not path.is_dir():  # a file: the load_state_dict hook took the averages
            if not self._loaded and self.average is None:
                warnings.warn("the checkpoint holds no EMA average: it starts from the loaded weights", stacklevel=2)
            return
        # a sharded folder (FSDP2): Lightning read the weights only; read the averages, shard by shard, in place
        import torch.distributed.checkpoint as dcp

        average = self._ensure(pl_module)
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        if not any(k.startswith(f"state_dict.{PREFIX}") for k in saved):
            warnings.warn(f"{path} holds no EMA average: it starts from the loaded weights", stacklevel=2)
            return
        dcp.load({"state_dict": {PREFIX + n: a for n, a in zip(self.names, average, strict=True)}}, checkpoint_id=path)
