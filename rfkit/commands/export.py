"""``rfkit export``: a checkpoint of a pretrained diffusers transformer, back as a folder diffusers loads.

- full fine-tuning: ``out/`` is ``transformer.save_pretrained(out)`` (``config.json`` and
  ``diffusion_pytorch_model.safetensors``): ``SD3Transformer2DModel.from_pretrained(out)``, or copy it
  over a pipeline folder's ``transformer/``.
- LoRA: ``out/pytorch_lora_weights.safetensors``, written by the pipeline's own ``save_lora_weights``
  with the adapter's config (rank, alpha, targets) as metadata:
  ``pipe.load_lora_weights(out)`` or ``pipe.transformer.load_lora_adapter(out, prefix="transformer")``.

Both write ``rfkit_export.json`` beside: the checkpoint, the base model and which weights went out.
A model with a second time (MeanFlow, shortcut) is refused: diffusers has no place for its ``r_embed``.
"""

from __future__ import annotations

import json
from pathlib import Path

from rfkit.checkpoint import load_checkpoint, read_checkpoint
from rfkit.models.pretrained.base import PretrainedTransformer

PIPELINES = {"SD3Transformer": "StableDiffusion3Pipeline", "FluxTransformer": "FluxPipeline"}
"""The diffusers pipeline whose LoRA format (``save_lora_weights``) an adapter's LoRA is written in."""


def _live_state(ckpt: Path) -> dict | None:
    """The live (not averaged) weights of a checkpoint that also holds an EMA; None when it holds none.

    :func:`rfkit.checkpoint.read_checkpoint` gives, for :class:`rfkit.ema.EMA` as for Lightning's
    ``EMAWeightAveraging``, the average as ``state_dict`` and the live weights as ``current_model_state``.
    """
    return read_checkpoint(ckpt).get("current_model_state")


def export(ckpt: Path, out: Path, ema: bool = True) -> dict:
    """Write the transformer of an rfkit checkpoint as a folder diffusers loads.

    Args:
        ckpt: a checkpoint written by ``rfkit fit`` whose model is a ``rfkit.models.pretrained`` adapter.
        out: the folder to write (created; must not hold files already).
        ema: export the EMA weights when the run kept an EMA (false: the live weights).
    """
    flow = load_checkpoint(ckpt)  # EMA weights when the run had an EMA
    model = flow.model
    if not isinstance(model, PretrainedTransformer):
        raise ValueError(
            f"{ckpt} holds a {type(model).__name__}, not a diffusers transformer (rfkit.models.pretrained): "
            "rfkit export writes SD3Transformer / FluxTransformer checkpoints; use rfkit sample for this one"
        )
    if model.second_time:
        raise ValueError(
            f"{ckpt} holds a {type(model).__name__} with a second time (second_time: true, a MeanFlow / shortcut "
            "run): its r_embed adds to the transformer's time embedding, and a diffusers transformer or LoRA file "
            "has no place for it (a pipeline would call it without r, a different model); sample it with "
            "`rfkit sample --ckpt` or load it in Python with rfkit.load_checkpoint"
        )
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already holds files: choose an empty or new folder")
    live = _live_state(ckpt)
    if live is not None and not ema:
        flow.load_state_dict(live)
    out.mkdir(parents=True, exist_ok=True)
    transformer = model.transformer
    if model.lora is None:
        transformer.save_pretrained(out)
        kind = "transformer"
    else:
        import diffusers
        from peft.utils import get_peft_model_state_dict

        pipeline = getattr(diffusers, PIPELINES[type(model).__name__])
        pipeline.save_lora_weights(
            out,
            transformer_lora_layers=get_peft_model_state_dict(transformer),
            transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
        )
        kind = "lora"
    report = {
        "checkpoint": str(ckpt),
        "out": str(out),
        "kind": kind,
        "weights": "ema" if live is not None and ema else "live",
        "base": model.path or "config",
        "base_sha256": model.base_sha256,
        "diffusers_class": model.diffusers_class,
    }
    (out / "rfkit_export.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
