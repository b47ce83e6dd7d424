"""Pictures of samples without matplotlib or torchvision: image grids and 2-D scatter plots (PIL)."""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw
from torch import Tensor


def grid_image(x: Tensor, nrow: int | None = None, upscale: int = 1, pad: int = 1) -> Image.Image:
    """(B, C, H, W) images in [-1, 1] -> one RGB grid.

    C = 1 is shown grey, C = 3 as RGB; other channel counts (raw latents) show their first three
    channels (or the first, repeated), each min-max normalised over the batch.
    """
    x = x.detach().float().cpu()
    if x.shape[1] in (1, 3):
        x = (x.clamp(-1, 1) + 1) / 2
    else:
        x = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
        lo = x.amin(dim=(0, 2, 3), keepdim=True)
        hi = x.amax(dim=(0, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if upscale > 1:
        x = x.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    b, _, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    canvas = torch.ones(3, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(b):
        r, c = divmod(i, nrow)
        canvas[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = x[i]
    return Image.fromarray((canvas.permute(1, 2, 0) * 255).round().byte().numpy())


def scatter_image(points: Tensor, reference: Tensor | None = None, size: int = 384) -> Image.Image:
    """(N, 2) points as a scatter plot (blue), over optional reference points (grey)."""
    pts = points.detach().float().cpu()
    both = pts if reference is None else torch.cat([pts, reference.detach().float().cpu()])
    lo, hi = both.amin(0), both.amax(0)
    span = (hi - lo).max().clamp_min(1e-6) * 1.1
    centre = (hi + lo) / 2

    def to_px(p: Tensor) -> list[tuple[float, float]]:
        q = ((p - centre) / span + 0.5) * size
        return [(float(a), float(size - b)) for a, b in q]

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    if reference is not None:
        for x, y in to_px(reference.detach().float().cpu()):
            draw.point((x, y), fill=(180, 180, 180))
    for x, y in to_px(pts):
        draw.ellipse((x - 1, y - 1, x + 1, y + 1), fill=(30, 80, 200))
    return img


def sample_image(x: Tensor, reference: Tensor | None = None, upscale: int = 1) -> Image.Image:
    """Scatter plot for (N, 2) vectors, image grid for (B, C, H, W) latents."""
    if x.ndim == 2 and x.shape[1] == 2:
        return scatter_image(x, reference)
    if x.ndim == 4:
        return grid_image(x, upscale=upscale)
    raise ValueError(f"cannot draw samples of shape {tuple(x.shape)}: expected (N, 2) or (B, C, H, W)")
