"""What the SD3 and Flux adapters share: loading a diffusers transformer, LoRA, the null condition.

The adapters hold the diffusers model as ``self.transformer`` (its code, its weights, its parameter
names under ``transformer.``) and write only the convention bridge of docs/design.md §1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rfkit.models.base import Cond, VelocityModel, zero_condition
from rfkit.models.layers import add_second_time, second_time_embedder
from rfkit.models.pretrained.lora import LoRA, add_lora, weights_sha256


def transformer_folder(path: str | Path) -> Path:
    """The folder ``from_pretrained`` reads: ``path`` itself, or a pipeline folder's ``transformer/``.

    Raises FileNotFoundError saying what to do when neither holds a transformer.
    """
    path = Path(path)
    if (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    if (path / "config.json").is_file():
        return path
    if (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{path} is a diffusers pipeline folder without a transformer/ subfolder: download the whole "
            "pipeline (e.g. `hf download stabilityai/stable-diffusion-3.5-medium --local-dir DIR`, or at least "
            "its transformer/ folder) and pass DIR or DIR/transformer as model.init_args.path"
        )
    raise FileNotFoundError(
        f"{path} holds no diffusers transformer (no config.json, no transformer/config.json): pass the folder "
        "of a downloaded pipeline or its transformer/ subfolder"
    )


class PretrainedTransformer(VelocityModel):
    """A diffusers transformer as an rfkit :class:`VelocityModel` (subclasses: SD3, Flux).

    Args:
        path: a local ``from_pretrained`` folder: a pipeline folder (its ``transformer/`` is used) or
            the transformer folder itself. Exactly one of ``path`` and ``config``.
        config: the transformer's constructor arguments (a ``config.json`` as a dict), for random
            weights; initialised under ``seed``, so a rebuild (resume, sampling) has the same base.
        lora: train LoRA adapters only (None: every weight trains).
        latent_size: side of the square latent sampled by default (SD3: the config's ``sample_size``).
        dtype: load the weights in this dtype ("bfloat16", "float16"; None: float32).
        seed: seed of the random weights of a ``config``-built model.
        second_time: accept a second time ``r`` (B,) (MeanFlow's ``h = r - t``, the shortcut's step
            size d): ``r_embed(r)`` (B, D) is added to the transformer's conditioning vector ``temb`` (B, D)
            (the output of ``transformer.time_text_embed``, which feeds every block's AdaLN; D =
            heads x head dim), so ``temb = embed(t) + embed(text) + r_embed(r)``. ``r_embed`` is
            :func:`rfkit.models.layers.second_time_embedder`, zero at init: the model is the diffusers
            model for every r until trained. It lives outside ``transformer`` (diffusers has no place
            for it), trains under LoRA with the adapters and is saved with them; ``rfkit export``
            refuses such a model.

    Conditioning: ``text`` (B, L, D) -> ``encoder_hidden_states``, ``pooled`` (B, D) ->
    ``pooled_projections``. The null condition of classifier-free guidance is zeros for both
    (:meth:`drop_condition`), what SD3 trained with when it dropped its text encoders; a pipeline's
    negative prompt ``""`` encodes to non-zero embeddings, a different null.
    """

    diffusers_class = ""  # "SD3Transformer2DModel", "FluxTransformer2DModel"
    default_lora_targets: tuple[str, ...] = ()
    cond_keys = ("text", "pooled")

    def __init__(
        self,
        path: str | None = None,
        config: dict[str, Any] | None = None,
        lora: LoRA | None = None,
        latent_size: int | None = None,
        dtype: str | None = None,
        seed: int = 0,
        second_time: bool = False,
    ) -> None:
        super().__init__()
        if (path is None) == (config is None):
            raise ValueError(
                f"{type(self).__name__} needs exactly one of path (a downloaded diffusers folder) or config (a dict)"
            )
        import diffusers

        cls = getattr(diffusers, self.diffusers_class)
        torch_dtype = getattr(torch, dtype) if dtype else None
        if path is not None:
            self.transformer = cls.from_pretrained(
                transformer_folder(path), local_files_only=True, torch_dtype=torch_dtype
            )
        else:
            with torch.random.fork_rng(devices=[]):  # reproducible random weights, global RNG untouched
                torch.manual_seed(seed)
                self.transformer = cls.from_config(dict(config))
            if torch_dtype is not None:
                self.transformer.to(torch_dtype)
        self.path = path
        self.lora = lora
        self.base_sha256: str | None = None
        if lora is not None:
            self.base_sha256 = weights_sha256(self.transformer)  # before the adapter renames the weights
            # saved with the adapters (a tensor, so every checkpoint path keeps it); the folder is in the config
            self.register_buffer(
                "base_sha256_bytes", torch.tensor(list(bytes.fromhex(self.base_sha256)), dtype=torch.uint8)
            )
            add_lora(self.transformer, lora, self.default_lora_targets)
            # frozen parameters and buffers (SD3's positional table alone is ~110 MB) come from the base
            self._frozen = {n for n, p in self.transformer.named_parameters() if not p.requires_grad}
            self._frozen |= {n for n, _ in self.transformer.named_buffers()}
            self.register_state_dict_post_hook(_drop_frozen)
            self.register_load_state_dict_pre_hook(_fill_frozen)
        self.latent_shape = self._latent_shape(latent_size)
        self.second_time = second_time
        self.r_embed = None
        self._r: Tensor | None = None  # the r of the transformer call under way (see _call)
        if second_time:
            c = self.transformer.config
            self.r_embed = second_time_embedder(c.num_attention_heads * c.attention_head_dim)
            # diffusers' forward computes temb inside; a hook adds r_embed(r) there rather than a copy of that forward
            self.transformer.time_text_embed.register_forward_hook(self._add_second_time)

    # ------------------------------------------------------------------ subclass hooks

    def _latent_shape(self, latent_size: int | None) -> tuple[int, int, int]:
        raise NotImplementedError

    @property
    def blocks(self) -> list[nn.Module]:
        """The repeated transformer blocks: the units of FSDP2 sharding and activation checkpointing."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    def _check(self, x: Tensor, cond: Cond, r: Tensor | None) -> None:
        self.check_second_time(r)
        missing = set(self.cond_keys) - set(cond)
        if missing:
            raise ValueError(f"{type(self).__name__} needs text conditioning; the batch lacks {sorted(missing)}")
        if x.ndim != 4:
            raise ValueError(f"{type(self).__name__} takes latents (B, C, H, W), got shape {tuple(x.shape)}")

    def _inputs(self, x: Tensor, cond: Cond) -> tuple[Tensor, Tensor, Tensor]:
        """``x``, ``text``, ``pooled`` in the transformer's dtype (under autocast, as given)."""
        dtype = x.dtype if torch.is_autocast_enabled(x.device.type) else self.transformer.dtype
        return x.to(dtype), cond["text"].to(dtype), cond["pooled"].to(dtype)

    def drop_condition(self, cond: Cond, drop: Tensor) -> dict[str, Tensor]:
        return zero_condition(cond, drop, self.cond_keys)

    def _call(self, r: Tensor | None, **inputs) -> Tensor:
        """``transformer(**inputs)[0]`` with ``r`` (B,) or None (= 0) added to its ``temb`` when ``second_time``."""
        self._r = r
        try:
            return self.transformer(**inputs, return_dict=False)[0]
        finally:
            self._r = None

    def _add_second_time(self, module: nn.Module, args: tuple, temb: Tensor) -> Tensor:
        """Hook on ``transformer.time_text_embed``: ``temb`` (B, D) -> ``temb + r_embed(r)``, in temb's dtype."""
        return add_second_time(temb, self.r_embed, self._r).to(temb.dtype)  # a float32 r_embed on a bf16 base


def _drop_frozen(module: PretrainedTransformer, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook under LoRA: checkpoints hold the adapters (and the base's fingerprint), not the base."""
    for name in module._frozen:
        state_dict.pop(f"{prefix}transformer.{name}", None)


def _fill_frozen(module: PretrainedTransformer, state_dict: dict, prefix: str, *args) -> None:
    """Load hook under LoRA: refuse adapters trained on another base; the base weights a checkpoint
    leaves out are the ones loaded from ``path``."""
    saved = state_dict.get(f"{prefix}base_sha256_bytes")
    trained_on = None if saved is None else bytes(saved.tolist()).hex()
    if trained_on is not None and trained_on != module.base_sha256:
        raise ValueError(
            f"these LoRA adapters were trained on a base whose weights have sha256 {trained_on[:16]}..., but the "
            f"model now loads {module.path or 'a config'} (sha256 {module.base_sha256[:16]}...): adapters only work "
            "on the base they were trained on; point model.init_args.path at that base (the checkpoint's config "
            "names it) or rebuild it from the same config and seed"
        )
    params = {**dict(module.transformer.named_parameters()), **dict(module.transformer.named_buffers())}
    for name in module._frozen:
        state_dict.setdefault(f"{prefix}transformer.{name}", params[name].detach())
