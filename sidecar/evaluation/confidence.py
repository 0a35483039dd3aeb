"""Is a confidence worth anything? How well it is calibrated, how well it separates right
answers from wrong ones, and what a threshold on it keeps.

Pure numpy over two arrays: `conf` (one confidence per reply, higher = surer) and `ok`
(whether that reply was right: a bool, or a quality in [0, 1] such as a row's field F1).
Shared by `sidecar eval` and the routing benchmarks, so their figures are one computation.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np

from sidecar.coverage import (  # one computation for `sidecar eval` and the daemon
    Values,
    arrays,
    at_threshold,
    kept_accuracy,
    threshold_for_accuracy,
)


def reliability_bins(conf: Values, ok: Values, bins: int = 15) -> list[dict[str, float]]:
    """Equal-width bins over [0, 1] (the first one closed at 0): each non-empty bin's range,
    row count, mean confidence and accuracy; what a reliability diagram draws."""
    c, o = arrays(conf, ok)
    out = []
    edges = np.linspace(0.0, 1.0, bins + 1)
    for i, (lo, hi) in enumerate(pairwise(edges)):
        above = c >= lo if i == 0 else c > lo
        sel = above & (c <= hi)
        if sel.any():
            out.append({"lo": float(lo), "hi": float(hi), "count": int(sel.sum()),
                        "confidence": float(c[sel].mean()), "accuracy": float(o[sel].mean())})  # fmt: skip
    return out


def expected_calibration_error(conf: Values, ok: Values, bins: int = 15) -> float:
    """ECE with equal-width bins: the gap between confidence and accuracy, weighted by bin
    size (NaN for no rows)."""
    c, _ = arrays(conf, ok)
    if not len(c):
        return float("nan")
    return sum(
        b["count"] / len(c) * abs(b["confidence"] - b["accuracy"])
        for b in reliability_bins(conf, ok, bins)
    )


def auroc(inside: Values, outside: Values) -> float:
    """P(an outside score > an inside score), ties half (NaN when either side is empty)."""
    a = np.asarray(inside, np.float64)
    b = np.asarray(outside, np.float64)
    if not len(a) or not len(b):
        return float("nan")
    both = np.concatenate([a, b])
    order = both.argsort(kind="stable")
    ranks = np.empty(len(both))
    ranks[order] = np.arange(1, len(both) + 1)
    # Average ranks over ties.
    _, inv, counts = np.unique(both, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    return float((ranks[len(a) :].sum() - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))


def separation(conf: Values, ok: Values) -> float:
    """The confidence's AUROC: P(a right reply is surer than a wrong one); 0.5 = worthless,
    NaN when every reply was right, or every one wrong (nothing to separate)."""
    c, o = arrays(conf, ok)
    right = o >= 0.5
    return auroc(c[~right], c[right])


def coverage_curve(conf: Values, ok: Values, coverages: Sequence[float]) -> list[dict[str, float]]:
    """For each coverage: the accuracy of that share of replies, the most confident first,
    and the threshold that keeps them (the confidence of the last one kept)."""
    c, o = arrays(conf, ok)
    if not len(c):
        return []
    order = np.argsort(-c, kind="stable")
    rows = []
    for cov in coverages:
        n = max(1, round(cov * len(c)))
        rows.append({"coverage": float(cov), "accuracy": float(o[order[:n]].mean()),
                     "threshold": float(c[order[n - 1]])})  # fmt: skip
    return rows


def best_accuracy(conf: Values, ok: Values) -> float:
    """The highest accuracy any threshold keeps (NaN for no replies)."""
    _, acc = kept_accuracy(conf, ok)
    return float(acc.max()) if len(acc) else float("nan")


__all__ = [
    "at_threshold",
    "auroc",
    "best_accuracy",
    "coverage_curve",
    "expected_calibration_error",
    "kept_accuracy",
    "reliability_bins",
    "separation",
    "threshold_for_accuracy",
]
