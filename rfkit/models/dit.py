"""DiT: a class-conditional diffusion transformer on latent patches (Peebles & Xie 2023).

Presets from the paper (width, depth, heads); patch size is a separate choice (DiT-S/2 = S with p=2):

    S: 384, 12, 6     B: 768, 12, 12     L: 1024, 24, 16     XL: 1152, 28, 16
"""

from __future__ import annotations

from torch import Tensor, nn

from rfkit.models.base import Cond, VelocityModel
from rfkit.models.layers import (
    FinalLayer,
    LabelEmbedding,
    Patches,
    Stream,
    TimestepEmbedder,
    add_second_time,
    attend,
    second_time_embedder,
)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero over the image tokens alone: ``(B, N, D), (B, D) -> (B, N, D)``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True) -> None:
        super().__init__()
        self.stream = Stream(width, heads, mlp_ratio, qk_norm)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        qkv, mods = self.stream.pre(x, c)
        return self.stream.post(x, attend(*qkv), mods)


class DiT(VelocityModel):
    """Velocity transformer for latents (B, C, H, W).

    Args:
        in_channels: latent channels C.
        input_size: default latent side H = W (used for sampling; any H, W divisible by
            ``patch_size`` is accepted at run time, so shape buckets need no new model).
        patch_size: side p of the square patches; N = (H / p) (W / p) tokens.
        width, depth, heads: transformer size (see the presets in the module docstring).
        mlp_ratio: hidden width of the MLPs relative to ``width``.
        num_classes: 0 for an unconditional model; else labels 0..num_classes-1, plus the null
            label ``num_classes`` that classifier-free guidance drops to.
        qk_norm: RMSNorm on queries and keys.
        second_time: accept a second time ``r`` (MeanFlow, shortcut), through a zero-initialised
            embedding added to the t embedding (see :meth:`VelocityModel.forward`).
    """

    def __init__(
        self,
        in_channels: int = 4,
        input_size: int = 32,
        patch_size: int = 2,
        width: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        qk_norm: bool = True,
        second_time: bool = False,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} must be divisible by patch_size {patch_size}")
        self.latent_shape = (in_channels, input_size, input_size)
        self.num_classes = num_classes
        self.cond_keys = ("cls",) if num_classes > 0 else ()
        self.patches = Patches(in_channels, patch_size, width)
        self.t_embed = TimestepEmbedder(width)
        self.second_time = second_time
        self.r_embed = second_time_embedder(width) if second_time else None
        self.y_embed = LabelEmbedding(num_classes, width) if num_classes > 0 else None
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.final = FinalLayer(width, in_channels * patch_size**2)

    def forward(self, x: Tensor, t: Tensor, cond: Cond, r: Tensor | None = None) -> Tensor:
        self.check_second_time(r)
        tokens = self.patches(x)  # (B, N, D)
        c = add_second_time(self.t_embed(t), self.r_embed, r)  # (B, D)
        if self.y_embed is not None:
            if "cls" not in cond:
                raise ValueError(f"DiT(num_classes={self.num_classes}) needs class labels: the batch has no 'cls'")
            c = c + self.y_embed(cond["cls"])
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.patches.unpatchify(self.final(tokens, c), like=x)

    def drop_condition(self, cond: Cond, drop: Tensor) -> dict[str, Tensor]:
        out = dict(cond)
        if self.y_embed is not None:
            out["cls"] = self.y_embed.drop(cond["cls"], drop)
        return out

    def num_tokens(self, latent_shape: tuple[int, ...]) -> int:
        return self.patches.num_tokens(latent_shape)
