"""Metrics: the running training loss, W2 for point clouds (torchmetrics), a Frechet distance for digits.

States are reduced across ranks, so every value is global."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.utilities import dim_zero_cat

from rfkit.ot import exact_assignment

DIGITS_WEIGHTS = Path(__file__).parent / "assets" / "digits_classifier.pt"


class LossMeter:
    """Running training loss, overall and by t-bin, for logging every N steps.

    One float64 state vector ``[loss sum, steps, K bin sums, K bin counts]`` updated in place:
    a handful of kernels per step, where torchmetrics' wrappers (input checks that synchronise
    with the device, bookkeeping through ``nn.Module.__setattr__``) cost ~50 us, more than a small
    model's whole step. ``read`` sums the state over ranks with the given reduce function, so
    every rank gets the global values, and starts a new window.
    """

    def __init__(self, num_bins: int = 10) -> None:
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        self.num_bins = num_bins
        self.state: Tensor | None = None

    def edges(self) -> list[float]:
        return [i / self.num_bins for i in range(self.num_bins + 1)]

    def update(self, loss: Tensor, t: Tensor, per_sample: Tensor) -> None:
        """``loss`` the step's (weighted) scalar loss; ``t`` and ``per_sample`` (B,) unweighted losses."""
        k = self.num_bins
        if self.state is None or self.state.device != loss.device:
            self.state = torch.zeros(2 + 2 * k, dtype=torch.float64, device=loss.device)
        self.state[0] += loss.detach()
        self.state[1] += 1
        idx = (t.detach() * k).long().clamp_(0, k - 1)
        self.state[2 : 2 + k].index_add_(0, idx, per_sample.detach().double())
        self.state[2 + k :] += torch.bincount(idx, minlength=k)

    def read(self, reduce=lambda x: x) -> tuple[float, Tensor]:
        """(mean loss per step, (K,) mean unweighted loss per t-bin, NaN where empty) over all ranks."""
        if self.state is None:
            raise ValueError("LossMeter.read before any update")
        total = reduce(self.state.clone())
        self.state.zero_()
        k = self.num_bins
        sums, counts = total[2 : 2 + k], total[2 + k :]
        bins = torch.where(counts > 0, sums / counts.clamp_min(1), float("nan"))
        return float(total[0] / total[1].clamp_min(1)), bins.float()


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


def to_digits_size(images: Tensor) -> Tensor:
    """(B, 1, s, s) -> (B, 1, 8, 8): undoes how ``rfkit.data.digits`` upsampled the 8x8 digits to s x s
    (PIL bilinear, a linear map ``U``: 64 -> s*s), by least squares, ``x = pinv(U) y``, so that
    :func:`digits_fid` can score digits made at a larger size (e.g. decoded by ``rfkit/assets/digits_vae``,
    which works on 16x16 upsamplings). Plain block averaging would not do: it blurs each 8x8 pixel
    with a quarter of each neighbour, which alone scores ~23 against the real digits.
    """
    if images.shape[-2] != images.shape[-1]:
        raise ValueError(f"to_digits_size needs square images, got {tuple(images.shape[-2:])}")
    size = images.shape[-1]
    if size == 8:
        return images.float()
    inverse = torch.from_numpy(_upsampling(size)).pinverse()  # (64, s*s)
    return (images.float().flatten(1) @ inverse.T).reshape(-1, 1, 8, 8)


def _upsampling(size: int):
    """(size*size, 64) float32: column k is PIL's bilinear resize of the k-th 8x8 unit image."""
    import numpy as np
    from PIL import Image

    columns = []
    for k in range(64):
        unit = np.zeros(64, np.float32)
        unit[k] = 1
        image = Image.fromarray(unit.reshape(8, 8), mode="F").resize((size, size), Image.Resampling.BILINEAR)
        columns.append(np.asarray(image, np.float32).reshape(-1))
    return np.stack(columns, 1)


def digits_fid() -> FrechetInceptionDistance:
    """torchmetrics' Frechet distance on :class:`DigitsFeatures` (an FID-like score for digits).

    Update with (B, 1, 8, 8) images in [-1, 1]: ``fid.update(x, real=True)``. Any feature module
    with a ``num_features`` attribute works the same way (Inception where you have its weights).
    """
    return FrechetInceptionDistance(feature=DigitsFeatures.pretrained(), normalize=True)
