"""``rfkit index``: the ``dataset.json`` manifest for latent shards that another tool wrote."""

from __future__ import annotations

import json
from pathlib import Path

from rfkit.data.index import index_shards
from rfkit.data.schema import MANIFEST


def vae_config(folder: Path) -> tuple[Path, dict]:
    """(folder, config) of a diffusers VAE folder, or of a pipeline folder's ``vae/``; reads no weights."""
    for where in (folder, folder / "vae"):
        if (where / "config.json").is_file():
            return where, json.loads((where / "config.json").read_text())
    raise FileNotFoundError(f"{folder} holds no config.json nor vae/config.json: give a diffusers AutoencoderKL folder")


def index(
    shards: Path,
    vae: Path | None = None,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    overwrite: bool = False,
) -> dict:
    """Scan latent shards another tool wrote and write the dataset.json that rfkit.data.LatentShards needs.

    The shards must hold rfkit's members per sample (``latent.npy`` (C, H, W), and optionally
    ``cls``, ``text.npy``, ``pooled.npy``, ``noise.npy``; see rfkit.data.schema). The keys, the
    text shapes and each shard's sample and latent-shape counts are read from the shards
    themselves. Unreadable shards are reported and left out; samples the training reader would
    reject are reported. Prints a report.

    Args:
        shards: the directory holding the shards (every ``*.tar`` in it); the manifest is written there.
        vae: the diffusers AutoencoderKL folder (or pipeline folder with ``vae/``) whose latents the
            shards hold. Its config gives the scaling, and ``rfkit sample`` decodes with it.
        scaling_factor: the model trains on ``(latent - shift_factor) * scaling_factor``; default
            the VAE's, else 1 (latents stored already scaled).
        shift_factor: see ``scaling_factor``; default the VAE's, else 0.
        overwrite: replace an existing dataset.json (otherwise refused, so nothing is lost).
    """
    if not shards.is_dir():
        raise FileNotFoundError(f"{shards} is not a directory; give the folder that holds the .tar shards")
    paths = sorted(p for p in shards.iterdir() if p.suffix == ".tar")
    if not paths:
        raise FileNotFoundError(f"{shards} holds no .tar shards")
    if (shards / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{shards / MANIFEST} exists; pass --overwrite true to replace it")
    extra: dict = {}
    config: dict = {}
    if vae is not None:
        folder, config = vae_config(vae)
        extra["vae"] = {"path": str(folder), "class": "AutoencoderKL", "config": config}
    extra["scaling_factor"] = scaling_factor if scaling_factor is not None else config.get("scaling_factor") or 1.0
    extra["shift_factor"] = shift_factor if shift_factor is not None else config.get("shift_factor") or 0.0
    report = index_shards(paths, shards, extra)
    for line in report["rejected"][:20]:
        print(f"rfkit index: will be rejected at training: {line}")
    for name, reason in report["unreadable"].items():
        print(f"rfkit index: unreadable, left out of the manifest: {name} ({reason})")
    report["rejected"] = len(report["rejected"])
    report["scaling_factor"], report["shift_factor"] = extra["scaling_factor"], extra["shift_factor"]
    return report
