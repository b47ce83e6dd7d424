"""Callbacks: sample grids, per-t loss curves and flow diagnostics, for the run directory and W&B.

EMA (:class:`rfkit.ema.EMA`, or Lightning's ``EMAWeightAveraging`` without FSDP2) swaps the averaged
weights in for validation, and the callbacks below act during validation, so they see the EMA weights.
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from rfkit.checkpoint import read_checkpoint
from rfkit.data.schema import COND_KEYS
from rfkit.diagnostics import flow_stats
from rfkit.images import sample_image
from rfkit.metrics import Wasserstein2
from rfkit.sampling import guided_velocity
from rfkit.solvers import Euler


def fixed_draw(batch: dict, num_samples: int, seed: int, device) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """A validation batch's data, the condition of its first ``n`` rows, and ``n`` draws of noise
    seeded by ``seed`` (the same at every validation), ``n = min(num_samples, batch size)``."""
    x1 = batch["latent"]
    n = min(num_samples, x1.shape[0])
    cond = {k: batch[k][:n] for k in COND_KEYS if k in batch}
    g = torch.Generator(device=device).manual_seed(seed)
    return x1, cond, torch.randn((n, *x1.shape[1:]), generator=g, device=device, dtype=x1.dtype)


class SampleGrid(pl.Callback):
    """At each validation, samples from fixed noise and saves ``samples/step_XXXXXXX.png`` + W&B image.

    The conditioning comes from the first validation batch (class labels are sorted, so a
    class-conditional grid reads in rows); the noise is the same at every validation, so the grids
    show progress on the same draws. When the data module has a VAE decoder (``LatentShards`` whose
    manifest names a VAE), the grid shows the decoded images.

    Args:
        num_samples: samples per grid (at most the validation batch size).
        seed: seed of the fixed noise.
        upscale: nearest-neighbour enlargement of small images.
    """

    def __init__(self, num_samples: int = 64, seed: int = 0, upscale: int = 4) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.upscale = upscale

    @override
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking:
            return
        x1, cond, x0 = fixed_draw(batch, self.num_samples, self.seed, pl_module.device)
        if "cls" in cond:
            order = torch.argsort(cond["cls"], stable=True)
            cond = {k: v[order] for k, v in cond.items()}
        samples = pl_module.sample(x0, cond)  # every rank runs it: sharded models need all ranks
        if not trainer.is_global_zero:
            return
        decoder = getattr(trainer.datamodule, "decoder", None)
        decode = decoder() if callable(decoder) else None
        if decode is not None:
            samples = decode(samples)
        image = sample_image(samples, reference=x1 if x1.ndim == 2 else None, upscale=self.upscale)
        out = Path(trainer.default_root_dir) / "samples" / f"step_{trainer.global_step:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples", [image], step=trainer.global_step)


class LossCurve(pl.Callback):
    """At each validation, records the training loss by t-bin: ``loss_by_t.csv`` + a W&B line plot.

    Reads the module's latest all-reduced curve (``RectifiedFlow.last_loss_by_t``), so it shows the
    loss over the last ``log_every_n_steps`` steps on all ranks.
    """

    @override
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        curve = getattr(pl_module, "last_loss_by_t", None)
        if curve is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        edges = pl_module.loss_meter.edges()
        mids = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
        path = Path(trainer.default_root_dir) / "loss_by_t.csv"
        new = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", *[f"t={m:.3f}" for m in mids]])
            writer.writerow([trainer.global_step, *[f"{v:.6g}" for v in curve.tolist()]])
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                rows = [[m, v] for m, v in zip(mids, curve.tolist(), strict=True) if v == v]
                table = wandb.Table(data=rows, columns=["t", "loss"])
                plot = wandb.plot.line(table, "t", "loss", title=f"training loss by t (step {trainer.global_step})")
                logger.experiment.log({"loss_by_t": plot, "trainer/global_step": trainer.global_step})


class FlowDiagnostics(pl.Callback):
    """At each validation: straightness and transport cost of the flow, and W2 for 2-D data.

    From fixed noise (the same at every validation) and the first validation batch's condition,
    integrates the (EMA) model's instantaneous velocity with ``num_steps`` Euler steps and logs
    ``val/straightness`` and ``val/transport_cost`` (see :mod:`rfkit.diagnostics`). For vector data
    it also logs ``val/w2@K``: the exact W2 between the validation batch and samples from the
    objective's sampler with K steps (Euler for flow matching, K jumps for MeanFlow / Shortcut:
    K network evaluations either way, twice that under guidance), for each K in ``w2_steps``,
    the measure of few-step quality.

    Args:
        num_samples: trajectories (at most the validation batch size).
        num_steps: Euler steps of the straightness integral.
        w2_steps: step counts at which W2 is measured (vector data only).
        seed: seed of the fixed noise.
    """

    def __init__(
        self, num_samples: int = 256, num_steps: int = 100, w2_steps: tuple[int, ...] = (1, 2, 4, 8), seed: int = 1
    ) -> None:
        self.num_samples = num_samples
        self.num_steps = num_steps
        self.w2_steps = tuple(w2_steps)
        self.seed = seed

    @override
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking:
            return
        x1, cond, x0 = fixed_draw(batch, self.num_samples, self.seed, pl_module.device)
        n = x0.shape[0]
        velocity = guided_velocity(pl_module.model, cond, pl_module.cfg_scale)
        stats = flow_stats(velocity, x0, self.num_steps)
        metrics = {"val/straightness": stats.straightness, "val/transport_cost": stats.transport_cost}
        if x1.ndim == 2:
            for steps in self.w2_steps:
                w2 = Wasserstein2()
                w2.update(x1, real=True)
                w2.update(pl_module.sample(x0, cond, num_steps=steps, solver=Euler()), real=False)
                metrics[f"val/w2@{steps}"] = float(w2.compute())
        pl_module.log_dict(metrics, on_epoch=True, batch_size=n, sync_dist=True)


class InitFromCheckpoint(pl.Callback):
    """Starts a new run from another run's model weights, e.g. a k-rectified flow from its teacher.

    The weights are the checkpoint's ``state_dict``: its EMA average when the run had EMA. Only a
    fresh run is initialised; a resumed run (``ckpt_path`` set, or a step > 0) keeps its own weights.
    An EMA of this run (:class:`rfkit.ema.EMA`, or Lightning's) starts its average from these
    weights: its first update copies the weights.

    A model with a second time (``second_time: true``, for MeanFlow or Shortcut) may start from a
    checkpoint without one: its zero-initialised second-time embedding is kept.

    Args:
        path: checkpoint written by ``rfkit fit``; the architectures must match. A LoRA checkpoint
            starts a LoRA run from its adapters, or a run without LoRA from the adapters merged into
            the base (:func:`rfkit.models.pretrained.lora.merged_weights`).
    """

    def __init__(self, path: str) -> None:
        self.path = path

    @override
    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.ckpt_path is not None or trainer.global_step > 0:
            return
        state = read_checkpoint(self.path, map_location="cpu")["state_dict"]
        weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        if "base_sha256_bytes" in weights and getattr(pl_module.model, "lora", False) is None:
            # a LoRA teacher, a fully fine-tuned student: the teacher's adapters merged into its base
            from rfkit.models.pretrained.lora import merged_weights

            weights = merged_weights(self.path)
        try:
            missing, unexpected = pl_module.model.load_state_dict(weights, strict=False)
        except RuntimeError as err:
            raise ValueError(f"{self.path} does not fit this run's model: {str(err).splitlines()[0]}") from err
        # a flow-matching checkpoint starts a MeanFlow / shortcut model: its second-time embedding keeps
        # its zero init, so the model computes exactly the checkpoint's velocity until trained
        missing = [k for k in missing if not k.startswith("r_embed.")]
        if missing or unexpected:
            raise ValueError(
                f"{self.path} does not fit this run's model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
