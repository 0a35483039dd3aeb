"""Percentiles and summaries of latency samples."""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from typing import Any


def percentile(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks (numpy's default);
    NaN for no samples."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def dist(xs: Sequence[float], nd: int = 2) -> dict[str, Any]:
    """n, p50, p99, min, max and mean, rounded to `nd` places ({"n": 0} for no samples)."""
    if not xs:
        return {"n": 0}
    return {
        "n": len(xs),
        "p50": round(percentile(xs, 50), nd),
        "p99": round(percentile(xs, 99), nd),
        "min": round(min(xs), nd),
        "max": round(max(xs), nd),
        "mean": round(statistics.fmean(xs), nd),
    }


def median_ci(xs: Sequence[float], n: int = 2000) -> list[float]:
    """95% bootstrap interval of the median (fixed seed: the same data gives the same answer)."""
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return [round(meds[int(0.025 * n)], 1), round(meds[int(0.975 * n)], 1)]
