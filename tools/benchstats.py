"""Statistics shared by the benchmark scripts in tools/ (imported as ``benchstats``: scripts run from tools/)."""

from __future__ import annotations

import statistics

import torch
from scipy.stats import t as student_t

from rfkit.metrics import Wasserstein2


def mean_interval(values: list[float], level: float) -> tuple[float, float, float]:
    """(mean, lower, upper): the two-sided Student-t interval of the mean over seeds at ``level``.

    ``half = t_{(1 + level) / 2, n - 1} * s / sqrt(n)``; one value gives a zero-width interval.
    """
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = student_t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


# ---------------------------------------------------------------------------- 2-D evaluation

N_EVAL = 2000  # points per evaluation draw, samples and data alike
EVAL_DRAWS = 5  # draws a single trained model is scored on (see eval_draw)


def eval_draw(target, draw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise (N_EVAL, 2), data (N_EVAL, 2)) of evaluation draw ``draw`` of a 2-D ``target``: fixed per draw.

    The same draw index gives every benchmark the same points. One draw is a noisy score: on
    8gaussians two independent data draws are 0.42 apart in W2 (the floor), and one trained model
    scored on draws 0-4 spreads over 0.43-0.62; so a single model is scored on ``EVAL_DRAWS`` draws.
    """
    noise = torch.randn(N_EVAL, 2, generator=torch.Generator().manual_seed(10_000 + draw))
    return noise, target(N_EVAL, torch.Generator().manual_seed(20_000 + draw))


def w2(samples: torch.Tensor, data: torch.Tensor) -> float:
    """Exact W2 between two point sets (rfkit.metrics.Wasserstein2)."""
    metric = Wasserstein2()
    metric.update(samples, real=False)
    metric.update(data, real=True)
    return float(metric.compute())
