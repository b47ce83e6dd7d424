"""Rebuilding a model from an rfkit checkpoint, without unpickling anything."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by ``rfkit fit`` with ``weights_only=True``; ValueError if it is not one.

    ``path`` is a file, or the folder of a sharded (FSDP2) checkpoint, assembled here into one.
    When the run kept an :class:`rfkit.ema.EMA`, ``state_dict`` holds the averaged weights (the
    others as trained) and ``current_model_state`` the trained ones, as with Lightning's EMA.
    """
    path = Path(path)
    sharded = path.is_dir() and (path / ".metadata").is_file()  # FSDP2 writes a folder, a file per rank
    if not path.is_file() and not sharded:
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = _assemble_sharded(path, map_location) if sharded else torch.load(path, map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(
            f"{path} is not an rfkit checkpoint: it does not load with weights_only=True "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
            "Checkpoints written by `rfkit fit` hold only tensors and plain config data."
        ) from err
    if not isinstance(ckpt, dict) or "rfkit" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not an rfkit checkpoint (no 'rfkit' section); was it written by `rfkit fit`?")
    from rfkit.ema import split_state_dict

    trained, averages = split_state_dict(ckpt["state_dict"])
    if averages:
        ckpt["state_dict"], ckpt["current_model_state"] = {**trained, **averages}, trained
    hparams = ckpt.get("hyper_parameters", {})
    if "model" not in hparams:
        raise ValueError(
            f"{path} does not record its components: it was written by a RectifiedFlow built in Python, "
            "not by `rfkit fit`. Build the same RectifiedFlow yourself and call load_state_dict(ckpt['state_dict'])."
        )
    return ckpt


def _assemble_sharded(folder: Path, map_location: str | torch.device) -> dict[str, Any]:
    """The full checkpoint a sharded folder holds (one file per rank, plus ``meta.pt``), in memory."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(folder, Path(tmp) / "full.pt")  # no process group needed
        shards = torch.load(Path(tmp) / "full.pt", map_location=map_location, weights_only=True)
    return {**torch.load(folder / "meta.pt", map_location=map_location, weights_only=True), **shards}


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"):
    """The :class:`rfkit.module.RectifiedFlow` stored at ``path``, in eval mode, ready to ``sample``.

    Weights are the EMA weights when the run kept an EMA (:class:`rfkit.ema.EMA`, or Lightning's
    ``EMAWeightAveraging``, which stores the average as the checkpoint's ``state_dict``). The module
    is rebuilt from the config the checkpoint carries; its whole run config is at ``module.run_config``.
    """
    from lightning.pytorch.cli import instantiate_module

    from rfkit.class_switch import class_switch_resets
    from rfkit.module import RectifiedFlow

    ckpt = read_checkpoint(path, map_location)
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if k != "_instantiator"}
    with class_switch_resets():  # the saved config is complete: nothing may come from the signature's defaults
        module = instantiate_module(RectifiedFlow, hparams)
    module.load_state_dict(ckpt["state_dict"])
    module.run_config = ckpt["rfkit"].get("config")
    return module.to(map_location).eval()
