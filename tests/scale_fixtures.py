"""Plugins and callbacks the scale and resume tests load by class_path (in-process and in subprocesses)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor

from rfkit.distributed import rank_and_world
from rfkit.timesteps import TimestepSampler
from rfkit.weightings import LossWeighting


class NaNOnLastRank(LossWeighting):
    """Weight 1, except NaN for every sample of the last rank at its ``call``-th call: a fault on one rank."""

    def __init__(self, call: int = 3) -> None:
        self.call, self.calls = call, 0

    def __call__(self, t: Tensor) -> Tensor:
        self.calls += 1
        rank, world = rank_and_world()
        return torch.full_like(t, float("nan") if self.calls == self.call and rank == world - 1 else 1.0)


class GlobalRNGUniform(TimestepSampler):
    """Uniform t from the global torch RNG (ignores the generator), so a run depends on restored RNG state."""

    def __call__(self, n: int, *, device=None, generator=None) -> Tensor:
        return torch.rand(n).clamp(1e-4, 1 - 1e-4).to(device)

    def density(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)


class HangAt(pl.Callback):
    """After optimizer step ``step``: write ``marker``, then wait (for SIGKILL, or SIGTERM which ends the wait)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        Path(self.marker).write_text(str(self.step))
        deadline = time.monotonic() + 120
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)


class OutputDtype(pl.Callback):
    """Records the dtype of the velocity model's output during training (checks autocast is on)."""

    seen: ClassVar[list[torch.dtype]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.model.register_forward_hook(lambda module, args, out: type(self).seen.append(out.dtype))


def child_env() -> dict[str, str]:
    """Environment for an ``rfkit`` subprocess: these fixtures importable, and its own W&B service.

    (wandb points child processes at the parent's service through WANDB_SERVICE; a child killed
    with SIGKILL would leave its run open there, unlike a real preempted job, whose service dies too.)
    """
    tests = str(Path(__file__).resolve().parent)
    # and none of the launch variables an in-process run may have set: with LOCAL_RANK inherited, the
    # child would take its ranks to be launched by someone else and wait for a rank nobody starts
    launch = (
        "LOCAL_RANK",
        "RANK",
        "WORLD_SIZE",
        "NODE_RANK",
        "GROUP_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    )
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE" and k not in launch}
    env["PYTHONPATH"] = os.pathsep.join([tests, env.get("PYTHONPATH", "")])
    return env
