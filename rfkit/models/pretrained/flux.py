"""diffusers' ``FluxTransformer2DModel`` (Flux.1) as an rfkit velocity model.

The bridge, from docs/design.md §1: ``sigma = 1 - t`` (rfkit's ``x_t = (1 - t) x0 + t x1`` is
diffusers' ``sigma noise + (1 - sigma) latents``). The Flux pipeline passes ``timestep = sigma``
(its scheduler's timestep / 1000) and the model multiplies by 1000 inside. The output is
``noise - latents = x0 - x1 = -v``, so ``v = -output`` (the same sign argument as SD3's, see
:mod:`rfkit.models.pretrained.sd3`).

Flux sees latents as tokens of 2x2 patches: (B, C, H, W) is packed to (B, H/2 W/2, 4C) with the
pipeline's own ``_pack_latents``, positions go in as ``img_ids`` (0, row, column) per token and
``txt_ids`` zeros per text token, and the output is unpacked the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rfkit.models.base import Cond
from rfkit.models.pretrained.base import PretrainedTransformer
from rfkit.models.pretrained.lora import FLUX_TARGETS, LoRA


class FluxTransformer(PretrainedTransformer):
    """Flux's transformer from diffusers: ``v(x, t) = -unpack(transformer(pack(x), timestep=1 - t))``.

    ``x`` (B, C, H, W) latents with H and W even (C = 16 for Flux.1, ``in_channels / 4``), ``text``
    (B, L, joint_attention_dim) the pipeline's T5 embeddings, ``pooled`` (B, pooled_projection_dim) its
    CLIP pooled vector.

    Args:
        guidance: the distilled guidance value fed to the guidance embedding of guidance-distilled
            models (Flux.1-dev: the pipeline's ``guidance_scale``, 3.5 by default); ignored by models
            without one (``guidance_embeds: false``, Flux.1-schnell).
        latent_size: side of the square latent sampled by default (128: 1024 px images).
        others: see :class:`rfkit.models.pretrained.base.PretrainedTransformer`.
    """

    diffusers_class = "FluxTransformer2DModel"
    default_lora_targets = FLUX_TARGETS

    def __init__(
        self,
        path: str | None = None,
        config: dict | None = None,
        lora: LoRA | None = None,
        latent_size: int | None = None,
        dtype: str | None = None,
        seed: int = 0,
        guidance: float = 3.5,
        second_time: bool = False,
    ) -> None:
        super().__init__(path, config, lora, latent_size, dtype, seed, second_time)
        self.guidance = guidance

    def _latent_shape(self, latent_size: int | None) -> tuple[int, int, int]:
        size = latent_size or 128
        if size % 2:
            raise ValueError(f"latent_size {size} is odd: {_ODD}")
        return (self.transformer.config.in_channels // 4, size, size)

    @property
    def blocks(self) -> list[nn.Module]:
        return [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]

    def forward(self, x: Tensor, t: Tensor, cond: Cond, r: Tensor | None = None) -> Tensor:
        from diffusers import FluxPipeline

        self._check(x, cond, r)
        b, c, height, width = x.shape
        if height % 2 or width % 2:
            raise ValueError(f"latent {height}x{width} has an odd side: {_ODD}")
        h, text, pooled = self._inputs(x, cond)
        tokens = FluxPipeline._pack_latents(h, b, c, height, width)  # (B, H/2 W/2, 4C)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, height // 2, width // 2, x.device, h.dtype)
        txt_ids = torch.zeros(text.shape[1], 3, device=x.device, dtype=h.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:  # like timestep, scaled by 1000 inside the model
            guidance = torch.full((b,), self.guidance, device=x.device, dtype=torch.float32)
        out = self._call(
            r,
            hidden_states=tokens,
            timestep=(1 - t).to(h.dtype),  # sigma
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=text,
            txt_ids=txt_ids,
            img_ids=img_ids,
        )
        return -FluxPipeline._unpack_latents(out, height, width, vae_scale_factor=1).to(x.dtype)

    def num_tokens(self, latent_shape: tuple[int, ...]) -> int:
        return (latent_shape[-2] // 2) * (latent_shape[-1] // 2)


_ODD = (
    "Flux packs 2x2 latent patches into one token, so latent height and width must be even; "
    "use images whose sides are multiples of 16 pixels (8 per latent pixel x 2)"
)
