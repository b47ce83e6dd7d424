"""torchmetrics metrics for training diagnostics; states sum across ranks, so values are global."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


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
