"""MMDiT: SD3's multimodal diffusion transformer (Esser et al. 2024, §4).

Text and image tokens keep separate weights (projections, norms, MLPs, modulation) and meet in one
joint attention over the concatenated sequence, so each modality reads the other at every layer.
Modulation comes from t plus the pooled text vector. Text arrives as precomputed embeddings
(B, L, text_dim) and a pooled vector (B, pooled_dim); classifier-free guidance drops both to zeros,
as SD3 does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rfkit.models.base import Cond, VelocityModel, zero_condition
from rfkit.models.layers import (
    FinalLayer,
    Patches,
    Stream,
    TimestepEmbedder,
    add_second_time,
    attend,
    second_time_embedder,
)


class JointBlock(nn.Module):
    """Text stream + image stream, one attention over [text; image] tokens.

    ``last``: the final block, whose text output nothing reads; its text stream only feeds the
    attention (SD3's ``context_pre_only``) and the text comes back unchanged.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True, last: bool = False):
        super().__init__()
        self.text = Stream(width, heads, mlp_ratio, qk_norm, pre_only=last)
        self.image = Stream(width, heads, mlp_ratio, qk_norm)
        self.last = last

    def forward(self, ctx: Tensor, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        # ctx (B, L, D), x (B, N, D), c (B, D)
        (qc, kc, vc), mods_c = self.text.pre(ctx, c)
        (qx, kx, vx), mods_x = self.image.pre(x, c)
        joint = attend(torch.cat([qc, qx], 2), torch.cat([kc, kx], 2), torch.cat([vc, vx], 2))  # (B, L+N, D)
        length = ctx.shape[1]
        image = self.image.post(x, joint[:, length:], mods_x)
        return (ctx if self.last else self.text.post(ctx, joint[:, :length], mods_c)), image


class MMDiT(VelocityModel):
    """SD3-style velocity transformer for latents (B, C, H, W) conditioned on text embeddings.

    Args:
        in_channels, input_size, patch_size: as :class:`rfkit.models.DiT`.
        text_dim: width of the per-token text embeddings (B, L, text_dim).
        pooled_dim: width of the pooled text vector (B, pooled_dim).
        width, depth, heads, mlp_ratio, qk_norm: transformer size; SD3 ties width = 64 * depth.
        second_time: accept a second time ``r`` (MeanFlow, shortcut), through a zero-initialised
            embedding added to the t embedding (see :meth:`VelocityModel.forward`).
    """

    def __init__(
        self,
        in_channels: int = 16,
        input_size: int = 32,
        patch_size: int = 2,
        text_dim: int = 384,
        pooled_dim: int = 384,
        width: int = 384,
        depth: int = 6,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        second_time: bool = False,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} must be divisible by patch_size {patch_size}")
        self.latent_shape = (in_channels, input_size, input_size)
        self.cond_keys = ("text", "pooled")
        self.patches = Patches(in_channels, patch_size, width)
        self.context_embed = nn.Linear(text_dim, width)
        self.t_embed = TimestepEmbedder(width)
        self.second_time = second_time
        self.r_embed = second_time_embedder(width) if second_time else None
        self.pooled_embed = nn.Sequential(nn.Linear(pooled_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(
            JointBlock(width, heads, mlp_ratio, qk_norm, last=i == depth - 1) for i in range(depth)
        )
        self.final = FinalLayer(width, in_channels * patch_size**2)

    def forward(self, x: Tensor, t: Tensor, cond: Cond, r: Tensor | None = None) -> Tensor:
        self.check_second_time(r)
        missing = set(self.cond_keys) - set(cond)
        if missing:
            raise ValueError(f"MMDiT needs text conditioning; the batch lacks {sorted(missing)}")
        tokens = self.patches(x)  # (B, N, D)
        ctx = self.context_embed(cond["text"].to(tokens.dtype))  # (B, L, D)
        c = self.t_embed(t) + self.pooled_embed(cond["pooled"].to(tokens.dtype))  # (B, D)
        c = add_second_time(c, self.r_embed, r)
        for block in self.blocks:
            ctx, tokens = block(ctx, tokens, c)
        return self.patches.unpatchify(self.final(tokens, c), like=x)

    def drop_condition(self, cond: Cond, drop: Tensor) -> dict[str, Tensor]:
        return zero_condition(cond, drop, ("text", "pooled"))  # SD3 drops text to zero embeddings

    def num_tokens(self, latent_shape: tuple[int, ...]) -> int:
        return self.patches.num_tokens(latent_shape)
