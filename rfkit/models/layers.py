"""Building blocks shared by the velocity transformers: embeddings, attention, modulation.

Shapes: B batch, N tokens, D width, H heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


def sinusoidal(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """(B,) scalars -> (B, dim) sin/cos features at geometric frequencies (DDPM, DiT).

    t in [0, 1] is multiplied by 1000 first, so the frequencies span the range DiT and SD3 were
    tuned on (they feed timesteps in [0, 1000]).
    """
    half = dim // 2
    dtype = torch.promote_types(t.dtype, torch.float32)  # float32, or float64 for float64 t (exact derivative checks)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = 1000.0 * t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class LabelEmbedding(nn.Embedding):
    """Class labels (B,) in 0..num_classes-1 -> (B, D), plus the null label ``num_classes``: the
    learned "no class" that classifier-free guidance trains with (dropped labels) and samples against.

    The one home of the null class: models embed with it and drop to it with :meth:`drop`.
    """

    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__(num_classes + 1, width)
        self.num_classes = num_classes

    def drop(self, labels: Tensor, drop: Tensor) -> Tensor:
        """(B,) labels with the rows where ``drop`` (B,) bool is True replaced by the null label."""
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, D): sinusoidal features through a 2-layer MLP (DiT)."""

    def __init__(self, width: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal(t, self.freq_dim).to(self.mlp[0].weight.dtype))


def second_time_embedder(width: int) -> TimestepEmbedder:
    """The embedding of a model's second time ``r`` (B,) -> (B, D), added to the t embedding.

    Its output layer starts at zero, so the model starts as if it had no second time: a
    flow-matching checkpoint loaded into it (the missing weights keep this init) gives the same
    velocity for every r until training moves them.
    """
    embed = TimestepEmbedder(width)
    nn.init.zeros_(embed.mlp[-1].weight)
    nn.init.zeros_(embed.mlp[-1].bias)
    return embed


def add_second_time(c: Tensor, embed: nn.Module | None, r: Tensor | None) -> Tensor:
    """``c + embed(r)``: r = None is r = 0 (the instantaneous velocity, see VelocityModel.forward)."""
    if embed is None:
        return c
    return c + embed(r if r is not None else torch.zeros(c.shape[0], device=c.device))


def sincos_2d(dim: int, h: int, w: int, device=None) -> Tensor:
    """Fixed 2-D sin-cos positions (MAE, DiT): (h * w, dim), half the channels per axis, row-major."""
    if dim % 4:
        raise ValueError(f"width must be divisible by 4 for 2-D sin-cos positions, got {dim}")
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64, device=device),
        torch.arange(w, dtype=torch.float64, device=device),
        indexing="ij",
    )
    omega = 1.0 / 10_000 ** (torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4))

    def axis(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega[None]  # (h*w, dim/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([axis(ys), axis(xs)], dim=1).float()


# --------------------------------------------------------------------------------------------
# Transformer pieces
# --------------------------------------------------------------------------------------------


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: (B, N, D) normalised tokens, (B, D) shift/scale from the conditioning."""
    return x * (1 + scale[:, None]) + shift[:, None]


class QKV(nn.Module):
    """(B, N, D) -> q, k, v each (B, H, N, D/H), with optional RMSNorm on q and k (SD3 §5.3.2).

    QK normalisation keeps attention logits bounded, which SD3 found necessary for stable
    mixed-precision training of large models.
    """

    def __init__(self, width: int, heads: int, qk_norm: bool = True) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        head_dim = width // heads
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return self.q_norm(q), self.k_norm(k), v


def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Scaled dot-product attention (flash / memory-efficient kernels where available) -> (B, N, D)."""
    return rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")


def mlp(width: int, ratio: float) -> nn.Sequential:
    hidden = int(width * ratio)
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))


class Stream(nn.Module):
    """A pre-norm transformer block's weights with adaLN-Zero, split around its attention.

    ``pre`` modulates and projects to q, k, v; the caller attends (alone for DiT, jointly with
    another stream for MMDiT); ``post`` adds the gated attention output and the gated MLP::

        x = x + gate1 * proj(attn);   x = x + gate2 * mlp(modulate(norm(x)))

    The modulation layer is zero-initialised, so every gate starts at 0 and the block starts as
    the identity: the network grows from a stable residual stream (DiT §3.2).

    ``pre_only``: the stream only feeds the attention (keys and values for the other stream) and has
    no ``post``: MMDiT's last text stream, whose output nothing reads (SD3's ``context_pre_only``).
    Building its projection and MLP anyway would leave parameters without gradients, which DDP refuses.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool, pre_only: bool = False) -> None:
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = QKV(width, heads, qk_norm)
        if not pre_only:
            self.proj = nn.Linear(width, width)
            self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
            self.mlp = mlp(width, mlp_ratio)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, (2 if pre_only else 6) * width))
        nn.init.zeros_(self.ada[-1].weight)
        nn.init.zeros_(self.ada[-1].bias)

    def pre(self, x: Tensor, c: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, ...]]:
        shift1, scale1, *post_mods = self.ada(c).chunk(2 if self.pre_only else 6, dim=-1)
        return self.qkv(modulate(self.norm1(x), shift1, scale1)), tuple(post_mods)

    def post(self, x: Tensor, attn: Tensor, mods: tuple[Tensor, ...]) -> Tensor:
        gate1, shift2, scale2, gate2 = mods
        x = x + gate1[:, None] * self.proj(attn)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN, then a zero-initialised projection to patch values, so the network starts at v = 0."""

    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.proj = nn.Linear(width, out_dim)
        for layer in (self.ada[-1], self.proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.proj(modulate(self.norm(x), shift, scale))


class Patches(nn.Module):
    """Latents (B, C, H, W) <-> tokens (B, N, D) with fixed 2-D sin-cos positions.

    Any H, W divisible by the patch size works at run time (shape buckets); positions are cached
    per grid rather than stored as a buffer, which would pin one shape.
    """

    def __init__(self, in_channels: int, patch_size: int, width: int) -> None:
        super().__init__()
        self.p = patch_size
        self.width = width
        self.embed = nn.Linear(in_channels * patch_size**2, width)
        self._pos: dict[tuple, Tensor] = {}

    def grid(self, x: Tensor) -> tuple[int, int]:
        h, w = x.shape[-2] // self.p, x.shape[-1] // self.p
        if (h * self.p, w * self.p) != tuple(x.shape[-2:]):
            raise ValueError(f"latent side {tuple(x.shape[-2:])} must be divisible by patch_size {self.p}")
        return h, w

    def forward(self, x: Tensor) -> Tensor:
        h, w = self.grid(x)
        key = (h, w, str(x.device))
        if key not in self._pos:
            self._pos[key] = sincos_2d(self.width, h, w, device=x.device)
        tokens = rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=self.p, p2=self.p)
        return self.embed(tokens) + self._pos[key].to(tokens.dtype)  # (B, N, D)

    def unpatchify(self, out: Tensor, like: Tensor) -> Tensor:
        """(B, N, p*p*C) patch values -> (B, C, H, W) shaped like ``like``."""
        h, w = self.grid(like)
        return rearrange(out, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=h, w=w, p1=self.p, p2=self.p)

    def num_tokens(self, latent_shape: tuple[int, ...]) -> int:
        return (latent_shape[-2] // self.p) * (latent_shape[-1] // self.p)
