"""What a confidence threshold keeps: the share of answers at or above it and their accuracy,
and the threshold that keeps the most while those kept reach a target accuracy.

Shared by `sidecar eval` (sidecar.evaluation.confidence re-exports these) and the daemon,
which chooses a task's threshold from shadow traffic (`tasks.NAME.target_accuracy`), so
both fit a threshold by one computation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
Values = Sequence[float] | Sequence[bool] | npt.NDArray[Any]


def arrays(conf: Values, ok: Values) -> tuple[F64, F64]:
    c = np.asarray(conf, np.float64)
    o = np.asarray(ok, np.float64)
    if c.shape != o.shape:
        raise ValueError(f"{len(c)} confidences for {len(o)} outcomes")
    return c, o


def at_threshold(conf: Values, ok: Values, threshold: float) -> dict[str, float]:
    """What a threshold keeps (confidence >= it): the share, and its accuracy (NaN if none)."""
    c, o = arrays(conf, ok)
    kept = c >= threshold
    return {"threshold": float(threshold),
            "coverage": float(kept.mean()) if len(c) else float("nan"),
            "accuracy": float(o[kept].mean()) if kept.any() else float("nan")}  # fmt: skip


def kept_accuracy(conf: Values, ok: Values) -> tuple[F64, F64]:
    """Every candidate threshold (each distinct confidence, surest first) and the accuracy of
    what it keeps (confidence >= it)."""
    c, o = arrays(conf, ok)
    values = np.unique(c)[::-1]
    order = np.argsort(-c, kind="stable")
    cum = np.cumsum(o[order])
    # Kept by threshold v: every reply with conf >= v, i.e. a prefix of `order` whose length
    # counts the ties of v too.
    kept = np.searchsorted(-c[order], -values, side="right")
    return values, cum[kept - 1] / kept


def threshold_for_accuracy(conf: Values, ok: Values, target: float) -> dict[str, float] | None:
    """The threshold that keeps the most replies while those kept are at least `target`
    accurate (`at_threshold` of it); None when no threshold reaches the target."""
    c, o = arrays(conf, ok)
    if not len(c):
        return None
    values, acc = kept_accuracy(c, o)
    good = np.nonzero(acc >= target - 1e-12)[0]
    if not len(good):
        return None
    return at_threshold(c, o, float(values[good[-1]]))
