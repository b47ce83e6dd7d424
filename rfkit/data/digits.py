"""scikit-learn's handwritten digits as 1x8x8 "latents" with class labels: real images, no download."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader
from typing_extensions import override

from rfkit.data.batches import BatchLoader, TensorBatches, per_rank_batch

__all__ = ["Digits", "digit_pixels", "export_images"]

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded (train, val) index split shared by :class:`Digits` and :func:`export_images`."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = round(val_fraction * n)
    return perm[n_val:], perm[:n_val]


def digit_pixels(size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as grey uint8 images (N, size, size), 0..16 -> 0..255, bilinear (PIL) from
    8x8 when ``size`` differs, and their labels (N,): the images ``export_images`` writes."""
    digits = load_digits()
    pixels = (digits.images * (255 / 16)).round().astype(np.uint8)  # (N, 8, 8)
    if size != 8:
        resize = [Image.fromarray(p).resize((size, size), Image.Resampling.BILINEAR) for p in pixels]
        pixels = np.stack([np.asarray(p) for p in resize])
    return pixels, digits.target


def export_images(
    out_dir: str | Path, size: int = 8, val_fraction: float = 0.1, seed: int = 0, limit: int | None = None
) -> Path:
    """Writes the digits as grey PNGs with captions and labels, for ``rfkit encode``.

    ``out_dir/train/00042.png`` (``size`` x ``size``, bilinear from 8x8), ``00042.txt`` ("a
    handwritten digit three") and ``00042.cls`` ("3"); ``out_dir/val/`` likewise, split as
    :class:`Digits` splits them. ``limit`` keeps the first images of each split (small tests).
    """
    pixels, labels = digit_pixels(size)
    for name, idx in zip(("train", "val"), split(len(pixels), val_fraction, seed), strict=True):
        folder = Path(out_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in sorted(idx.tolist())[:limit]:
            Image.fromarray(pixels[i]).save(folder / f"{i:05d}.png")
            (folder / f"{i:05d}.txt").write_text(f"a handwritten digit {NAMES[labels[i]]}")
            (folder / f"{i:05d}.cls").write_text(str(labels[i]))
    return Path(out_dir)


class Digits(pl.LightningDataModule):
    """1,797 8x8 grey digits (UCI), pixel values 0..16 mapped to [-1, 1], with labels 0..9.

    Batches are ``{"latent": (B, 1, 8, 8) float32, "cls": (B,) int64}``. A fixed, seeded
    ``val_fraction`` of the images is held out for validation.

    Args:
        batch_size: images per batch and per rank.
        batches_per_epoch: length of a training epoch (the set is small, so passes repeat).
        val_fraction: share of images held out.
        seed: seeds the split and the shuffling.
        global_batch_size: images per optimizer step over all ranks; when set, each rank takes
            ``global_batch_size / (world size x accumulate_grad_batches)`` and ``batch_size`` is unused.
    """

    def __init__(
        self,
        batch_size: int = 128,
        batches_per_epoch: int = 200,
        val_fraction: float = 0.1,
        seed: int = 0,
        global_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.val_fraction = val_fraction
        self.seed = seed
        self.global_batch_size = global_batch_size

    @override
    def setup(self, stage: str | None = None) -> None:
        self.batch_size = per_rank_batch(self.global_batch_size, self.batch_size, self.trainer)
        digits = load_digits()
        images = torch.from_numpy(digits.images).float().div(8.0).sub(1.0).unsqueeze(1)  # (N, 1, 8, 8)
        labels = torch.from_numpy(digits.target).long()
        train, val = split(len(labels), self.val_fraction, self.seed)
        self.train_set = {"latent": images[train], "cls": labels[train]}
        self.val_set = {"latent": images[val], "cls": labels[val]}

    @override
    def train_dataloader(self) -> DataLoader:
        return BatchLoader(TensorBatches(self.train_set, self.batch_size, self.batches_per_epoch, self.seed))

    @override
    def val_dataloader(self) -> DataLoader:
        batch = min(self.batch_size, len(self.val_set["cls"]))
        return DataLoader(TensorBatches(self.val_set, batch, None), batch_size=None)
