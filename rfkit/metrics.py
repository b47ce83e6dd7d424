"""torchmetrics metrics: per-t losses, W2 for point clouds, a Frechet distance for digits.

States are reduced across ranks, so every value is global."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.utilities import dim_zero_cat

from rfkit.couplings import exact_assignment

DIGITS_WEIGHTS = Path(__file__).parent / "assets" / "digits_classifier.pt"


class BinnedMean(Metric):
    """Mean of per-sample values grouped by t into ``num_bins`` equal bins of [0, 1].

    ``compute()`` returns (num_bins,) means, NaN for bins that saw no sample. With several ranks
    the sums and counts are all-reduced first, so every rank gets the global curve.
    """

    full_state_update = False

    def __init__(self, num_bins: int = 10) -> None:
        super().__init__()
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        self.num_bins = num_bins
        self.add_state("total", torch.zeros(num_bins, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(num_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, t: Tensor, values: Tensor) -> None:
        idx = (t.detach() * self.num_bins).long().clamp(0, self.num_bins - 1)
        self.total.index_add_(0, idx, values.detach().double())
        self.count.index_add_(0, idx, torch.ones_like(values, dtype=torch.float64))

    def compute(self) -> Tensor:
        return torch.where(self.count > 0, self.total / self.count.clamp_min(1), float("nan"))

    def edges(self) -> list[float]:
        return [i / self.num_bins for i in range(self.num_bins + 1)]


class Wasserstein2(Metric):
    """Exact 2-Wasserstein distance between generated and reference point clouds (e.g. 2-D toys).

    ``W2 = sqrt(min_pi mean_i ||x_i - y_pi(i)||^2)`` over permutations, solved exactly by the same
    assignment solver as :class:`rfkit.couplings.MinibatchOT` (equal counts: the larger set is cut).
    Points are gathered across ranks before the solve.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("fake", default=[], dist_reduce_fx="cat")
        self.add_state("real", default=[], dist_reduce_fx="cat")

    def update(self, points: Tensor, real: bool) -> None:
        (self.real if real else self.fake).append(points.detach().flatten(1).double())

    def compute(self) -> Tensor:
        if not len(self.fake) or not len(self.real):
            raise ValueError("Wasserstein2 needs both real and generated points: update(x, real=True/False)")
        fake, real = dim_zero_cat(self.fake), dim_zero_cat(self.real)
        n = min(len(fake), len(real))
        fake, real = fake[:n], real[:n]
        perm = exact_assignment(fake, real)  # fake[perm[j]] is paired with real[j]
        return (fake[perm] - real).pow(2).sum(1).mean().sqrt()


class DigitsFeatures(nn.Module):
    """A small classifier of the 8x8 digits; its penultimate layer is the feature space of a
    Frechet distance on digits (Inception cannot be downloaded here and is not made for 8x8).

    (B, 1, 8, 8) images in [-1, 1] -> (B, 128) features; ``logits`` gives the 10-way output.
    ``pretrained()`` loads the weights that ``tools/train_digits_classifier.py`` made.
    """

    num_features = 128

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x.float())

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self(x))

    @classmethod
    def pretrained(cls) -> DigitsFeatures:
        model = cls()
        model.load_state_dict(torch.load(DIGITS_WEIGHTS, weights_only=True))
        return model.eval().requires_grad_(False)


def digits_fid() -> FrechetInceptionDistance:
    """torchmetrics' Frechet distance on :class:`DigitsFeatures` (an FID-like score for digits).

    Update with (B, 1, 8, 8) images in [-1, 1]: ``fid.update(x, real=True)``. Any feature module
    with a ``num_features`` attribute works the same way (Inception where you have its weights).
    """
    return FrechetInceptionDistance(feature=DigitsFeatures.pretrained(), normalize=True)
