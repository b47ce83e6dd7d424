"""A timestep sampler rfkit does not ship: the Beta distribution."""

from __future__ import annotations

import math

import torch
from scipy.special import betaincinv
from torch import Tensor

from rfkit.timesteps import TimestepSampler

_EPS = torch.finfo(torch.float32).eps


class Beta(TimestepSampler):
    """``t ~ Beta(a, b)`` in rfkit's convention (t = 0 noise, t = 1 data)::

        p(t) = t^(a - 1) (1 - t)^(b - 1) / B(a, b),    mean a / (a + b)

    ``a = b = 1`` is uniform; ``a < b`` trains more at high noise, ``a > b`` near the data;
    ``a, b > 1`` give a bump, ``a, b < 1`` a U. π0 (Black et al. 2024) trains its flow with
    ``t / 0.999 ~ Beta(1, 1.5)`` (their ``Beta((s - τ) / s; 1.5, 1)``), favouring noise.

    Drawn by inverse CDF so that the generator alone decides the draws (torch's Beta sampler
    takes no generator): ``t = I^-1_{a,b}(u)`` with ``u ~ U(0, 1)`` in float64 from ``generator``
    and the inverse regularised incomplete beta function ``scipy.special.betaincinv``, on the CPU.

    Args:
        a: first shape parameter (mass near t = 1, data), > 0.
        b: second shape parameter (mass near t = 0, noise), > 0.
    """

    def __init__(self, a: float = 2.0, b: float = 2.0) -> None:
        for name, value in (("a", a), ("b", b)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0 (a Beta shape parameter), got {value}")
        self.a, self.b = float(a), float(b)
        self._log_beta = math.lgamma(self.a) + math.lgamma(self.b) - math.lgamma(self.a + self.b)

    def __call__(self, n: int, *, device=None, generator=None) -> Tensor:
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"n must be a positive int (the number of timesteps to draw), got {n!r}")
        where = generator.device if generator is not None else device
        u = torch.rand(n, generator=generator, device=where, dtype=torch.float64)
        t = torch.from_numpy(betaincinv(self.a, self.b, u.cpu().numpy())).float()
        return t.clamp(_EPS, 1.0 - _EPS).to(device)  # float32 rounding may reach 0 or 1

    def density(self, t: Tensor) -> Tensor:
        log_p = (self.a - 1.0) * torch.log(t) + (self.b - 1.0) * torch.log1p(-t) - self._log_beta
        return torch.exp(log_p)
