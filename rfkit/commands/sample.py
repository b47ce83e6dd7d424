"""``rfkit sample``: draw samples from a checkpoint, save them, and measure the flow that made them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rfkit.checkpoint import load_checkpoint
from rfkit.data.schema import COND_KEYS, FIELDS
from rfkit.diagnostics import flow_stats
from rfkit.images import sample_image
from rfkit.sampling import guided_velocity
from rfkit.solvers import Solver


def load_condition(
    labels: list[int] | None, cond_file: Path | None, n: int, offset: int = 0
) -> dict[str, torch.Tensor]:
    """Conditioning for samples ``offset .. offset + n - 1``: sample i gets row ``i mod N`` of the
    class labels or of the arrays in an ``.npz`` file (``cls`` (N,), ``text`` (N, L, D) or (L, D),
    ``pooled`` (N, D) or (D,); a single text / pooled row serves every sample).
    """
    rows = torch.arange(offset, offset + n)
    cond: dict[str, torch.Tensor] = {}
    if labels:
        cond["cls"] = torch.tensor(labels, dtype=torch.long)[rows % len(labels)]
    if cond_file is not None:
        with np.load(cond_file, allow_pickle=False) as arrays:
            for key in COND_KEYS:
                if key not in arrays:
                    continue
                value = torch.from_numpy(arrays[key])
                if value.ndim == FIELDS[key].row_ndim and not FIELDS[key].label:
                    value = value[None]  # one condition for every sample
                cond[key] = value[rows % len(value)]
    return cond


def vae_decoder(run_config: dict | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """:func:`rfkit.data.shards.vae_decoder` of the run's training shards, or None (pixel data,
    shards no longer there, no VAE in their manifest)."""
    from rfkit.data.shards import resolve_shards
    from rfkit.data.shards import vae_decoder as manifest_decoder

    data = ((run_config or {}).get("config") or {}).get("data") or {}
    args = data.get("init_args") or {}
    if not args.get("shards"):
        return None
    try:
        _, info = resolve_shards(args["shards"], args.get("manifest"))
    except (OSError, ValueError):
        return None
    return manifest_decoder(info)


def sample(
    ckpt: Path,
    out: Path,
    num_samples: int = 64,
    solver: Solver | None = None,
    num_steps: int | None = None,
    shift: float | None = None,
    cfg_scale: float | None = None,
    labels: list[int] | None = None,
    cond_file: Path | None = None,
    prompts: list[str] | None = None,
    pipeline: Path | None = None,
    max_sequence_length: int | None = None,
    seed: int = 0,
    diagnostics_steps: int = 100,
    device: str = "cpu",
) -> dict:
    """Sample from an rfkit checkpoint (EMA weights when the run had EMA).

    Writes to ``out``: ``samples.png`` (an image grid, decoded by the VAE when the training data's
    manifest names one, or a scatter plot for 2-D data),
    ``samples.npy`` (the raw latents, float32), ``images.npy`` (the decoded images in [-1, 1],
    float32, only when a VAE decoded them), ``noise.npy`` (the starting noise), and
    ``stats.json`` (settings, NFE, and the straightness and transport cost of the flow from the
    same noise, measured with ``diagnostics_steps`` Euler steps; 0 skips them).

    Samples follow the checkpoint's objective (:mod:`rfkit.objectives`): a flow-matching model
    integrates its velocity with ``solver``; a MeanFlow or shortcut model jumps ``num_steps`` times
    (``solver`` unused), one network evaluation per jump.

    Args:
        ckpt: checkpoint written by ``rfkit fit``.
        out: output directory (created).
        num_samples: how many samples.
        solver: ODE solver (default: the one the model was trained to validate with; flow matching only).
        num_steps: solver steps, or jumps (default: the checkpoint's ``sample_steps``).
        shift: inference timestep shift (default: the checkpoint's ``sample_shift``).
        cfg_scale: classifier-free guidance scale (default: the checkpoint's).
        labels: class labels, cycled over the samples (class-conditional models).
        cond_file: ``.npz`` with ``cls``, ``text``, ``pooled`` arrays (text-conditioned models).
        prompts: text prompts, cycled over the samples, encoded by ``pipeline``'s own ``encode_prompt``
            (SD3 / Flux; see :mod:`rfkit.models.pretrained.prompts`).
        pipeline: local folder of the diffusers pipeline the model came from: its text encoders encode
            ``prompts``; its ``vae/`` (when present) decodes the samples for ``samples.png``.
        max_sequence_length: T5 tokens of the prompts (default: the pipeline's; use what the shards had).
        seed: seed of the starting noise.
        diagnostics_steps: Euler steps for the straightness measurement (0: skip).
        device: where to run ("cpu", "cuda", ...).
    """
    flow = load_checkpoint(ckpt, map_location=device)
    out.mkdir(parents=True, exist_ok=True)
    cond = load_condition(labels, cond_file, num_samples)
    if prompts and pipeline is None:
        raise ValueError("--prompts needs --pipeline: the local pipeline folder whose text encoders encode them")
    if prompts:
        from rfkit.models.pretrained.prompts import PipelinePrompts

        text, pooled = PipelinePrompts(pipeline, device, max_sequence_length)(prompts)
        rows = torch.arange(num_samples) % len(prompts)  # sample i: prompt i mod P
        cond.update(text=text[rows], pooled=pooled[rows])
    cond = {k: v.to(device) for k, v in cond.items()}
    missing = sorted(set(flow.model.cond_keys) - set(cond))
    if missing:
        raise ValueError(
            f"{type(flow.model).__name__} needs conditioning {missing}: pass --labels (class labels, e.g. "
            "--labels [0,1,2]), --prompts with --pipeline, or --cond_file (an .npz with cls / text / pooled arrays)"
        )
    g = torch.Generator(device=device).manual_seed(seed)
    x0 = torch.randn((num_samples, *flow.model.latent_shape), generator=g, device=device)
    settings = flow.sampling.override(solver=solver, num_steps=num_steps, shift=shift, cfg_scale=cfg_scale)
    x1 = flow.sample(x0, cond, **settings.kwargs())
    np.save(out / "samples.npy", x1.float().cpu().numpy())
    np.save(out / "noise.npy", x0.float().cpu().numpy())
    decode = None
    if pipeline is not None:
        from rfkit.models.pretrained.prompts import pipeline_vae_decoder

        decode = pipeline_vae_decoder(pipeline)
    if decode is None:
        decode = vae_decoder(flow.run_config)
    shown = decode(x1) if decode is not None else x1
    if decode is not None:
        np.save(out / "images.npy", shown.float().numpy())
    sample_image(shown, upscale=4 if shown.ndim == 4 and shown.shape[-1] <= 16 else 1).save(out / "samples.png")
    stats = {
        "checkpoint": str(ckpt),
        "decoded_by_vae": decode is not None,
        "num_samples": num_samples,
        "prompts": prompts,
        "seed": seed,
        "objective": repr(flow.objective),
        **settings.record(),
        "nfe": flow.nfe(conditional=bool(cond), **settings.kwargs()),  # the objective's sampler: jumps cost one each
    }
    if diagnostics_steps > 0:
        fs = flow_stats(guided_velocity(flow.model, cond, settings.cfg_scale), x0, diagnostics_steps)
        stats.update(
            straightness=fs.straightness, transport_cost=fs.transport_cost, diagnostics_steps=diagnostics_steps
        )
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats
