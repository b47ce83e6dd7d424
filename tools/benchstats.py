"""Statistics shared by the benchmark scripts in tools/ (imported as ``benchstats``: scripts run from tools/)."""

from __future__ import annotations

import statistics

from scipy.stats import t as student_t


def mean_interval(values: list[float], level: float) -> tuple[float, float, float]:
    """(mean, lower, upper): the two-sided Student-t interval of the mean over seeds at ``level``.

    ``half = t_{(1 + level) / 2, n - 1} * s / sqrt(n)``; one value gives a zero-width interval.
    """
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = student_t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half
