"""LoRA adapters on a diffusers transformer, through peft (the way diffusers' training scripts add them).

``W x`` becomes ``W x + (alpha / rank) B A x`` on every targeted linear layer, with ``A`` (rank, in)
random and ``B`` (out, rank) zero at the start, so a fresh adapter leaves the model unchanged.
Only ``A`` and ``B`` train; the base weights stay frozen and bit-identical.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["FLUX_TARGETS", "SD3_TARGETS", "LoRA", "add_lora", "weights_sha256"]

SD3_TARGETS = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)
"""diffusers' ``train_dreambooth_lora_sd3.py`` default: both streams' attention projections."""

FLUX_TARGETS = (
    *SD3_TARGETS,
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
"""diffusers' ``train_dreambooth_lora_flux.py`` default: attention projections and both MLPs."""


@dataclass
class LoRA:
    """The ``lora`` setting of a pretrained transformer.

    Args:
        rank: inner dimension ``r`` of ``B A`` (diffusers' scripts: 4).
        alpha: scale numerator, the update is ``(alpha / rank) B A x``; None: ``alpha = rank`` (scale 1),
            as diffusers' scripts set it.
        target_modules: module names, matched as peft does (the whole name, or its tail after a dot);
            None: the defaults of diffusers' DreamBooth LoRA script for that model
            (:data:`SD3_TARGETS`, :data:`FLUX_TARGETS`).
        dropout: dropout on the adapter's input.
    """

    rank: int = 4
    alpha: float | None = None
    target_modules: list[str] | None = field(default=None)
    dropout: float = 0.0

    def config(self, default_targets: tuple[str, ...]):
        """The ``peft.LoraConfig`` (gaussian init of ``A``, as diffusers' scripts)."""
        from peft import LoraConfig

        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            lora_dropout=self.dropout,
            init_lora_weights="gaussian",
            target_modules=list(self.target_modules or default_targets),
        )


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's rule for a list of names


def add_lora(transformer: nn.Module, lora: LoRA, default_targets: tuple[str, ...]) -> None:
    """Freeze ``transformer`` and add the adapter (``transformer.add_adapter``, diffusers' peft bridge).

    Raises ValueError naming a target that matches no module, with the linear layers there are.
    """
    config = lora.config(default_targets)
    names = [n for n, _ in transformer.named_modules()]
    for target in config.target_modules:
        if not any(_matches(n, target) for n in names):
            linears = sorted({n.split(".", 2)[-1] for n, m in transformer.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(
                f"lora target {target!r} matches no module of {type(transformer).__name__}; "
                f"name linear layers by their tail, e.g. one of {linears[:24]}"
            )
    from diffusers.training_utils import cast_training_params

    transformer.requires_grad_(False)
    transformer.add_adapter(config)  # makes only the lora_A / lora_B weights trainable
    # adapters in float32 on a bf16 / fp16 base, as diffusers' scripts do: updates of size lr * grad vanish in bf16
    cast_training_params(transformer, dtype=torch.float32)


def weights_sha256(module: nn.Module) -> str:
    """sha256 over every tensor of ``module.state_dict()`` (names, dtypes, shapes and bytes, in name order).

    Reads every weight once (about a second per GB).
    """
    h = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def merged_weights(ckpt: str) -> dict[str, torch.Tensor]:
    """A LoRA run's checkpoint as full weights: ``W + (alpha / r) B A`` merged into the base, under the names of
    the model without LoRA (``transformer.<diffusers name>``); the checkpoint's EMA adapters when it kept one.

    What a fully fine-tuned student of a LoRA teacher starts from (:class:`rfkit.callbacks.InitFromCheckpoint`).
    Merging and unwrapping are diffusers' own (``fuse_lora``, ``unload_lora``).
    """
    from rfkit.checkpoint import load_checkpoint

    transformer = load_checkpoint(ckpt, map_location="cpu").model.transformer
    transformer.fuse_lora()
    transformer.unload_lora()
    return {f"transformer.{k}": v for k, v in transformer.state_dict().items()}
