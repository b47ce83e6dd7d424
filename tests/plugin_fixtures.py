"""Plugins defined outside rfkit, as a user's own package would: used by the CLI tests via class_path."""

from __future__ import annotations

import torch
from torch import Tensor

from rfkit.timesteps import TimestepSampler


class CountingSampler(TimestepSampler):
    """Uniform t that counts its calls (class-wide), so a test can tell it was really used."""

    calls = 0

    def __init__(self, low: float = 0.1, high: float = 0.9) -> None:
        self.low, self.high = low, high

    def __call__(self, n: int, *, device=None, generator=None) -> Tensor:
        type(self).calls += 1
        u = torch.rand(n, generator=generator, device=generator.device if generator else device).to(device)
        return self.low + (self.high - self.low) * u

    def density(self, t: Tensor) -> Tensor:
        inside = (t > self.low) & (t < self.high)
        return inside.to(t.dtype) / (self.high - self.low)
