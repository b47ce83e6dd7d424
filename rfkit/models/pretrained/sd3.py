"""diffusers' ``SD3Transformer2DModel`` (SD3, SD3.5) as an rfkit velocity model.

The bridge, from docs/design.md §1. rfkit's path is ``x_t = (1 - t) x0 + t x1`` (x0 noise, x1
data); diffusers' is ``x = sigma noise + (1 - sigma) latents``, so ``sigma = 1 - t`` and the two
describe the same point. SD3 embeds ``timestep = 1000 sigma`` (its scheduler's ``timesteps``).
It is trained to output ``noise - latents = x0 - x1`` (diffusers' SD3 training script's target),
while rfkit's velocity is ``v = dx_t/dt = x1 - x0``; hence ``v = -output``. Check: the scheduler's
Euler step ``x + (sigma_next - sigma) output`` equals rfkit's ``x + (t_next - t) v`` because
``sigma_next - sigma = -(t_next - t)`` and ``output = -v``.
"""

from __future__ import annotations

from torch import Tensor, nn

from rfkit.models.base import Cond
from rfkit.models.pretrained.base import PretrainedTransformer
from rfkit.models.pretrained.lora import SD3_TARGETS


class SD3Transformer(PretrainedTransformer):
    """SD3's MMDiT from diffusers: ``v(x, t) = -transformer(x, timestep=1000 (1 - t))``.

    ``x`` (B, C, H, W) latents (C = 16 for SD3), ``text`` (B, L, joint_attention_dim) the pipeline's
    CLIP+T5 prompt embeddings, ``pooled`` (B, pooled_projection_dim). Arguments: see
    :class:`rfkit.models.pretrained.base.PretrainedTransformer`.
    """

    diffusers_class = "SD3Transformer2DModel"
    default_lora_targets = SD3_TARGETS

    def _latent_shape(self, latent_size: int | None) -> tuple[int, int, int]:
        c = self.transformer.config
        size = latent_size or c.sample_size
        return (c.in_channels, size, size)

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.transformer.transformer_blocks)

    def forward(self, x: Tensor, t: Tensor, cond: Cond, r: Tensor | None = None) -> Tensor:
        self._check(x, cond, r)
        h, text, pooled = self._inputs(x, cond)
        sigma = 1 - t
        out = self._call(
            r,
            hidden_states=h,
            timestep=(1000 * sigma).to(h.dtype),
            encoder_hidden_states=text,
            pooled_projections=pooled,
        )
        return -out.to(x.dtype)

    def num_tokens(self, latent_shape: tuple[int, ...]) -> int:
        p = self.transformer.config.patch_size
        return (latent_shape[-2] // p) * (latent_shape[-1] // p)
