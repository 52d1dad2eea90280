"""Confidence intervals: Student's t intervals of a mean and of paired differences (the quality
section), and distribution-free intervals of a median (the timing ratios)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean of ``values`` with the two-sided ``confidence`` interval of the t-distribution
    (``n - 1`` degrees of freedom): ``mean ± t_{(1 + confidence) / 2, n - 1} * s / sqrt(n)``.
    One value has no interval (half width ``nan``)."""
    from scipy.stats import t

    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_ci needs at least one value")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n, mean = len(values), statistics.fmean(values)
    half = math.nan if n < 2 else float(t.ppf((1 + confidence) / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return {"mean": mean, "half_width": half, "low": mean - half, "high": mean + half, "n": n}


def median_ci(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Median of ``values`` with a distribution-free interval of at least ``confidence``: the order
    statistics ``x_(j)`` and ``x_(n+1-j)`` for the largest ``j`` with ``P(Binomial(n, 1/2) < j) <=
    (1 - confidence) / 2`` (each value falls below the true median with probability 1/2, independently).
    ``coverage`` is the interval's exact level; with too few values (n < 6 at 95%) there is none (nan)."""
    ordered = sorted(float(v) for v in values)
    if not ordered:
        raise ValueError("median_ci needs at least one value")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n, tail, j, below = len(ordered), (1 - confidence) / 2, 0, 0.0
    while j < n // 2 and below + math.comb(n, j) / 2**n <= tail:  # below: P(B <= j - 1)
        below += math.comb(n, j) / 2**n
        j += 1
    median = statistics.median(ordered)
    if j == 0:
        return {"median": median, "low": math.nan, "high": math.nan, "coverage": math.nan, "n": n}
    return {"median": median, "low": ordered[j - 1], "high": ordered[n - j], "coverage": 1 - 2 * below, "n": n}


def paired_difference(values: Mapping[int, float], reference: Mapping[int, float],
                      confidence: float = 0.95) -> dict[str, float] | None:
    """``mean_ci`` of the per-seed differences ``values[s] - reference[s]`` over the seeds both have
    (None when fewer than two seeds are shared)."""
    seeds = sorted(set(values) & set(reference))
    if len(seeds) < 2:
        return None
    return {**mean_ci([values[s] - reference[s] for s in seeds], confidence), "seeds": seeds}


def verdict(difference: Mapping[str, float] | None) -> str:
    """``better`` / ``worse`` when the interval excludes 0, ``no clear difference`` otherwise."""
    if difference is None or math.isnan(difference["half_width"]):
        return "not enough seeds"
    if difference["low"] > 0:
        return "better"
    if difference["high"] < 0:
        return "worse"
    return "no clear difference"
