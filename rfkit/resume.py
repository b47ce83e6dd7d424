"""Resume that loses nothing: finding the last complete checkpoint, atomic writes, RNG, SIGTERM.

What a checkpoint restores, and who keeps it:

==========================  ===============================================================
weights, optimizer, LR      Lightning (``state_dict``, ``optimizer_states``, ``lr_schedulers``)
EMA average                 :class:`rfkit.ema.EMA` (``state_dict`` under ``ema/<name>``, sharded
                            under FSDP2), or Lightning's ``EMAWeightAveraging`` (``state_dict`` holds
                            the average, ``current_model_state`` the trained weights)
global step, epoch, batch   Lightning's loop state
data position               :class:`rfkit.data.batches.BatchLoader` (a "stateful" loader)
training noise, t, drops    nothing to keep: drawn from (seed, step, batch), see RectifiedFlow
RNG (torch, CUDA, numpy,    :class:`Resume`, one state per rank
python)
W&B run id                  :class:`Resume`; ``rfkit fit`` resumes the same W&B run
==========================  ===============================================================
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from rfkit.distributed import rank_and_world

__all__ = [
    "AtomicCheckpointIO",
    "NonFiniteLossError",
    "Resume",
    "checkpoint_dirs",
    "checkpoint_step",
    "find_last_checkpoint",
]

_META = "meta.pt"  # what Lightning's sharded (distributed) checkpoints keep beside the shards


# --------------------------------------------------------------------------------------------
# Finding the last complete checkpoint
# --------------------------------------------------------------------------------------------


def _load_meta(path: Path) -> dict[str, Any]:
    """The non-tensor part of a checkpoint file or of a sharded checkpoint folder."""
    if path.is_dir():
        if not (path / ".metadata").is_file():
            raise ValueError("sharded checkpoint without .metadata")
        path = path / _META
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def checkpoint_step(path: str | Path, finite: bool = False) -> int | None:
    """The ``global_step`` a checkpoint was written at, or None if it is incomplete or unreadable.

    ``finite=True`` also returns None when a weight in a checkpoint file is NaN or inf (the
    weights of a sharded folder are not read).
    """
    try:
        ckpt = _load_meta(Path(path))
        weights = ckpt.get("state_dict", {}).values() if finite else ()
        if not all(torch.isfinite(w).all() for w in weights if torch.is_floating_point(w)):
            return None
        return int(ckpt["global_step"])
    except Exception:  # truncated, half-written, foreign: not a checkpoint to resume from
        return None


def find_last_checkpoint(dirs: list[str | Path], finite: bool = False) -> Path | None:
    """The most recently written complete ``*.ckpt`` (file or sharded folder) in ``dirs``.

    Files still being written carry a ``.partial`` suffix (see :class:`AtomicCheckpointIO`) and
    are never considered; a candidate that does not load (or, with ``finite``, holds non-finite
    weights) is skipped with a warning.
    """
    found = {p.resolve() for d in dirs if Path(d).is_dir() for p in Path(d).glob("*.ckpt")}
    for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        if checkpoint_step(path, finite) is not None:
            return path
        warnings.warn(f"skipping {path}: it is incomplete, not a checkpoint, or not finite", stacklevel=2)
    return None


def checkpoint_dirs(trainer: pl.Trainer) -> list[Path]:
    """Where a run's checkpoints go: every ModelCheckpoint's folder, and the run directory (SLURM's hpc_ckpt)."""
    dirs = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    return [*dirs, Path(trainer.default_root_dir)]


def saved_wandb_run_id(path: str | Path) -> str | None:
    """The W&B run id stored by :class:`Resume` in a checkpoint, if any."""
    return _load_meta(Path(path)).get("callbacks", {}).get("Resume", {}).get("wandb_run_id")


class NonFiniteLossError(FloatingPointError):
    """The training loss was NaN or inf on some rank; raised on every rank at the same step."""

    @classmethod
    def at(cls, trainer: pl.Trainer | None) -> NonFiniteLossError:
        """The error for the current step, naming the checkpoint to resume from."""
        step = trainer.global_step if trainer is not None else None
        last = find_last_checkpoint(checkpoint_dirs(trainer), finite=True) if trainer is not None else None
        return cls(
            f"non-finite training loss at step {step} (global_step; on at least one rank). "
            f"Last good checkpoint: {last or 'none written yet'}. Resume from it with a lower learning "
            "rate or more warm-up, or set model.skip_nonfinite=true to skip such steps."
        )


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``<name>.partial``, syncs it to disk, then renames it over ``<name>`` (atomic in one filesystem).

    A crash mid-write leaves the previous checkpoint intact and a ``.partial`` file that
    :func:`find_last_checkpoint` ignores. ``rfkit fit`` installs it on the strategy.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if "://" in str(path):  # object stores: Lightning's writer (fsspec)
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.partial")
        with open(partial, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)


# --------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain data (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class Resume(pl.Callback):
    """Keeps what Lightning's checkpoints lack; ``rfkit fit`` always adds it (configure it under ``resume:``).

    - Every checkpoint holds the RNG states of every rank (torch, CUDA, numpy, python) and the
      W&B run id; on resume each rank gets its own states back before the first step.
    - On SIGTERM (preemption, ``scancel``, Kubernetes eviction) Lightning finishes the current
      step (or validation batch) on every rank; this callback then writes ``last.ckpt`` and the
      process exits with 0. Stopped mid-validation, the EMA average is first swapped back out.
    - When training ends at a step no checkpoint was written at (``max_steps`` is not a multiple
      of ``every_n_train_steps``), it writes ``last.ckpt``, so the last steps are not lost (unless a
      ``ModelCheckpoint(save_last=True)`` that has saved nothing yet is about to write it).
    - Lightning's ``EMAWeightAveraging`` copies the average into the model when training ends,
      before a final ``last.ckpt`` is written; that file would then resume from the average. The
      trained weights are kept at the last epoch end and stored as ``current_model_state``.

    Both writes need checkpointing on (a ``ModelCheckpoint``) and go to its folder.

    Args:
        auto: ``rfkit fit`` resumes from the last complete checkpoint of the run directory
            (``trainer.default_root_dir``) when ``--ckpt_path`` is not given.
        save_on_sigterm: write ``last.ckpt`` when SIGTERM arrives.
    """

    def __init__(self, auto: bool = True, save_on_sigterm: bool = True) -> None:
        self.auto = auto
        self.save_on_sigterm = save_on_sigterm
        self._trainer: pl.Trainer | None = None
        self._restore: dict[str, Any] | None = None
        self._trained: dict[str, torch.Tensor] | None = None
        self._saved_step = -1

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    # ---- RNG states and W&B id, in every checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        states, (_, world) = [_rng_state()], rank_and_world()
        if world > 1:  # every rank writes the checkpoint's dict, rank 0's is saved: gather into it
            states = [None] * world
            dist.all_gather_object(states, _rng_state())
        loggers = self._trainer.loggers if self._trainer is not None else []
        run_id = next((lg.version for lg in loggers if isinstance(lg, WandbLogger)), None)
        return {"rng": states, "wandb_run_id": run_id}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        rank, world = rank_and_world()
        if len(state["rng"]) == world:
            self._restore = state["rng"][rank]
        else:
            saved = len(state["rng"])
            warnings.warn(f"RNG states were saved by {saved} ranks, not {world}: not restored", stacklevel=2)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restore is not None:  # as late as possible: nothing may draw between this and step 1
            _set_rng_state(self._restore)
            self._restore = None

    # ---- SIGTERM, and the end of training
    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.save_on_sigterm and isinstance(exception, SIGTERMException):
            if trainer.validating:  # stopped mid-validation, with the EMA average swapped in: swap it out
                for cb in trainer.callbacks:
                    if isinstance(cb, WeightAveraging):
                        cb.on_validation_epoch_end(trainer, pl_module)
            self._save_last(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a ModelCheckpoint(save_last=True) that has saved nothing yet writes last.ckpt itself right
        # after this hook (Lightning >= 2.6); writing it here too would make it version the file (last-v1.ckpt)
        writes_last = any(
            getattr(cb, "save_last", False) and not getattr(cb, "_last_checkpoint_saved", True)
            for cb in trainer.checkpoint_callbacks
        )
        if self._saved_step != trainer.global_step and not writes_last:
            self._save_last(trainer)

    def _save_last(self, trainer: pl.Trainer) -> None:
        callback = trainer.checkpoint_callback
        if callback is None:
            return
        folder = Path(callback.dirpath or Path(trainer.default_root_dir) / "checkpoints")
        path = folder / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}.ckpt"
        if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
            # make last.ckpt the callback's own (its state is saved with it): a resumed run then overwrites
            # it, instead of versioning its next one to last-v1.ckpt beside this older file
            callback.last_model_path = callback.format_checkpoint_name({}, ModelCheckpoint.CHECKPOINT_NAME_LAST)
            path = Path(callback.last_model_path)
        trainer.save_checkpoint(path)  # every rank calls this: saving is collective

    # ---- the trained weights, not the EMA, in a checkpoint written after training ended
    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        steps_done = trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps
        epochs_done = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        ema = any(isinstance(cb, WeightAveraging) for cb in trainer.callbacks)
        if ema and (steps_done or epochs_done or trainer.should_stop):
            self._trained = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._saved_step = checkpoint["global_step"]
        if self._trained is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = self._trained
