"""2-D toy targets for N(0, I) -> data flows, drawn fresh for every batch.

``Moons`` and ``EightGaussians`` reproduce torchcfm's benchmark code exactly (including its
quirks, noted below), so W2 numbers compare with torchcfm's published ones.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from rfkit.data.batches import BatchLoader, Position, per_rank_batch, rank_and_world, stream_seed

__all__ = ["Checkerboard", "Circles", "EightGaussians", "Moons", "Spirals", "Toy2D", "ToyDistribution"]


class ToyDistribution(ABC):
    """A 2-D target distribution."""

    @abstractmethod
    def __call__(self, n: int, generator: torch.Generator) -> Tensor:
        """(n, 2) float32 samples."""


class Moons(ToyDistribution):
    """torchcfm's ``sample_moons``: torchdyn's ``generate_moons(n, noise=0.2) * 3 - 1``.

    As in torchdyn, the points sit on an even grid of each half circle (``linspace(0, pi)``, the
    first n//2 on the upper moon) and the noise is *uniform*, ``U(0, noise)``, one draw per point
    added to both coordinates.
    """

    def __init__(self, noise: float = 0.2) -> None:
        self.noise = noise

    def __call__(self, n: int, generator: torch.Generator) -> Tensor:
        n_out, n_in = n // 2, n - n // 2
        a_out, a_in = torch.linspace(0, math.pi, n_out), torch.linspace(0, math.pi, n_in)
        x = torch.cat([torch.cos(a_out), 1 - torch.cos(a_in)])
        y = torch.cat([torch.sin(a_out), 1 - torch.sin(a_in) - 0.5])
        pts = torch.stack([x, y], dim=1) + torch.rand(n, 1, generator=generator) * self.noise
        return pts * 3 - 1


class EightGaussians(ToyDistribution):
    """torchcfm's ``sample_8gaussians``: 8 Gaussians on a circle of radius ``scale``.

    torchcfm builds ``MultivariateNormal(0, sqrt(var) * I)``: ``var`` enters the *covariance* as
    its square root, so each coordinate's std is ``var ** 0.25`` (0.562 for var = 0.1). Kept as is.
    """

    def __init__(self, scale: float = 5.0, var: float = 0.1) -> None:
        self.scale = scale
        self.var = var
        s = 1 / math.sqrt(2)
        self.centers = torch.tensor([(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (s, -s), (-s, s), (-s, -s)]) * scale

    def __call__(self, n: int, generator: torch.Generator) -> Tensor:
        noise = torch.randn(n, 2, generator=generator) * self.var**0.25
        which = torch.randint(0, 8, (n,), generator=generator)
        return self.centers[which] + noise


class Checkerboard(ToyDistribution):
    """FFJORD's checkerboard: uniform on the black squares of a 4x4 board over [-4, 4]^2."""

    def __call__(self, n: int, generator: torch.Generator) -> Tensor:
        x1 = torch.rand(n, generator=generator) * 4 - 2
        x2 = torch.rand(n, generator=generator) - torch.randint(0, 2, (n,), generator=generator) * 2.0
        x2 = x2 + torch.floor(x1) % 2
        return torch.stack([x1, x2], dim=1) * 2


class Circles(ToyDistribution):
    """Two concentric rings of radii 2 and 4 with Gaussian radial noise ``noise``."""

    def __init__(self, noise: float = 0.1) -> None:
        self.noise = noise

    def __call__(self, n: int, generator: torch.Generator) -> Tensor:
        angle = torch.rand(n, generator=generator) * 2 * math.pi
        radius = 2.0 * (1 + torch.randint(0, 2, (n,), generator=generator))
        radius = radius + self.noise * torch.randn(n, generator=generator)
        return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)


class Spirals(ToyDistribution):
    """FFJORD's two spirals: arms ``±(-cos(r) r, sin(r) r) + U(0, 0.5)``, divided by 3, plus N(0, 0.1^2)."""

    def __call__(self, n: int, generator: torch.Generator) -> Tensor:
        r = torch.sqrt(torch.rand(n, 1, generator=generator)) * 540 * (2 * math.pi) / 360
        arm = torch.cat([-torch.cos(r) * r, torch.sin(r) * r], dim=1) + torch.rand(n, 2, generator=generator) * 0.5
        sign = torch.randint(0, 2, (n, 1), generator=generator) * 2.0 - 1.0
        return arm * sign / 3 + torch.randn(n, 2, generator=generator) * 0.1


class _Fresh(IterableDataset):
    """Yields ``num_batches`` whole batches ``{"latent": (B, 2)}``; each rank draws its own stream."""

    def __init__(self, target: ToyDistribution, batch_size: int, num_batches: int, seed: int) -> None:
        self.target = target
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.seed = seed
        self.position = Position()

    def __iter__(self):
        rank, _ = rank_and_world()
        epoch, skip = self.position.start_pass(self.num_batches)
        g = torch.Generator().manual_seed(stream_seed(self.seed, rank, epoch))
        for i in range(self.num_batches):
            batch = {"latent": self.target(self.batch_size, g)}  # drawn even when skipped: the stream stays the same
            if i >= skip:
                self.position.advance()
                yield batch

    def __len__(self) -> int:
        return self.num_batches


class Toy2D(pl.LightningDataModule):
    """N(0, I) -> ``target`` in 2-D; the flow's noise is drawn by the module, data here.

    Training batches are drawn fresh (an infinite data set); validation is one fixed batch of
    ``val_size`` points, the same in every run with the same seed.

    Args:
        target: the data distribution (``Moons``, ``EightGaussians``, ``Checkerboard``, ...).
        batch_size: samples per batch and per rank.
        batches_per_epoch: length of a training epoch.
        val_size: points in the fixed validation batch.
        seed: seeds both streams.
        global_batch_size: points per optimizer step over all ranks; when set, each rank draws
            ``global_batch_size / (world size x accumulate_grad_batches)`` and ``batch_size`` is unused.
    """

    def __init__(
        self,
        target: ToyDistribution | None = None,
        batch_size: int = 256,
        batches_per_epoch: int = 500,
        val_size: int = 2000,
        seed: int = 0,
        global_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.target = target if target is not None else Moons()
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.val_size = val_size
        self.seed = seed
        self.global_batch_size = global_batch_size

    @override
    def setup(self, stage: str | None = None) -> None:
        self.batch_size = per_rank_batch(self.global_batch_size, self.batch_size, self.trainer)

    @override
    def train_dataloader(self) -> DataLoader:
        return BatchLoader(_Fresh(self.target, self.batch_size, self.batches_per_epoch, self.seed))

    @override
    def val_dataloader(self) -> DataLoader:
        pts = self.target(self.val_size, torch.Generator().manual_seed(self.seed + 10_000))
        return DataLoader([{"latent": pts}], batch_size=None)
