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

    Args:
        ckpt: checkpoint written by ``rfkit fit``.
        out: output directory (created).
        num_samples: how many samples.
        solver: ODE solver (default: the one the model was trained to validate with).
        num_steps: solver steps (default: the checkpoint's ``sample_steps``).
        shift: inference timestep shift (default: the checkpoint's ``sample_shift``).
        cfg_scale: classifier-free guidance scale (default: the checkpoint's).
        labels: class labels, cycled over the samples (class-conditional models).
        cond_file: ``.npz`` with ``cls``, ``text``, ``pooled`` arrays (text-conditioned models).
        seed: seed of the starting noise.
        diagnostics_steps: Euler steps for the straightness measurement (0: skip).
        device: where to run ("cpu", "cuda", ...).
    """
    flow = load_checkpoint(ckpt, map_location=device)
    out.mkdir(parents=True, exist_ok=True)
    cond = {k: v.to(device) for k, v in load_condition(labels, cond_file, num_samples).items()}
    missing = sorted(set(flow.model.cond_keys) - set(cond))
    if missing:
        raise ValueError(
            f"{type(flow.model).__name__} needs conditioning {missing}: pass --labels (class labels, e.g. "
            "--labels [0,1,2]) or --cond_file (an .npz with cls / text / pooled arrays)"
        )
    g = torch.Generator(device=device).manual_seed(seed)
    x0 = torch.randn((num_samples, *flow.model.latent_shape), generator=g, device=device)
    settings = {
        "solver": solver if solver is not None else flow.sample_solver,
        "num_steps": num_steps or flow.sample_steps,
        "shift": flow.sample_shift if shift is None else shift,
        "cfg_scale": flow.cfg_scale if cfg_scale is None else cfg_scale,
    }
    x1 = flow.sample(x0, cond, **settings)
    np.save(out / "samples.npy", x1.float().cpu().numpy())
    np.save(out / "noise.npy", x0.float().cpu().numpy())
    decode = vae_decoder(flow.run_config)
    shown = decode(x1) if decode is not None else x1
    if decode is not None:
        np.save(out / "images.npy", shown.float().numpy())
    sample_image(shown, upscale=4 if shown.ndim == 4 and shown.shape[-1] <= 16 else 1).save(out / "samples.png")
    stats = {
        "checkpoint": str(ckpt),
        "decoded_by_vae": decode is not None,
        "num_samples": num_samples,
        "seed": seed,
        **{k: (repr(v) if k == "solver" else v) for k, v in settings.items()},
        "nfe": settings["solver"].nfe(settings["num_steps"]) * (2 if settings["cfg_scale"] != 1 and cond else 1),
    }
    if diagnostics_steps > 0:
        fs = flow_stats(guided_velocity(flow.model, cond, settings["cfg_scale"]), x0, diagnostics_steps)
        stats.update(
            straightness=fs.straightness, transport_cost=fs.transport_cost, diagnostics_steps=diagnostics_steps
        )
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats
