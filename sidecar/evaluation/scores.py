"""What the replies got right: accuracy and macro-F1 of labels, per-field F1 and exact match
of extracted JSON, the most confused label pairs, latency percentiles.

Pure functions over plain values; `summary` assembles them into the report.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def accuracy(gold: Sequence[str], predicted: Sequence[str]) -> float:
    if not gold:
        return float("nan")
    return sum(g == p for g, p in zip(gold, predicted, strict=True)) / len(gold)


def per_label(gold: Sequence[str], predicted: Sequence[str]) -> dict[str, dict[str, float]]:
    """Each gold label's precision, recall, F1 and support. A predicted label that is no
    gold label (an empty "none of these", a label of the task the set never uses) counts
    against the precision of nothing and the recall of the gold one."""
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for g, p in zip(gold, predicted, strict=True):
        if g == p:
            tp[g] += 1
        else:
            fn[g] += 1
            fp[p] += 1
    out = {}
    for label in sorted(set(gold)):
        out[label] = {**_prf(tp[label], fp[label], fn[label]), "support": tp[label] + fn[label]}
    return out


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def macro_f1(gold: Sequence[str], predicted: Sequence[str]) -> float:
    """The mean F1 over the gold labels (each label counts the same, however rare)."""
    labels = per_label(gold, predicted)
    if not labels:
        return float("nan")
    return sum(v["f1"] for v in labels.values()) / len(labels)


def confused(gold: Sequence[str], predicted: Sequence[str], most: int) -> dict[str, Any]:
    """The confusion matrix over the labels most involved in mistakes: up to `most` labels
    (by errors as gold plus errors as answer), rows gold, columns predicted; `other` counts
    answers outside those labels."""
    errors: Counter[str] = Counter()
    for g, p in zip(gold, predicted, strict=True):
        if g != p:
            errors[g] += 1
            errors[p] += 1
    if not errors:  # no mistakes: show the largest labels' diagonal
        errors = Counter(gold)
    labels = [lb for lb, _ in sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))][:most]
    index = {lb: i for i, lb in enumerate(labels)}
    matrix = [[0] * (len(labels) + 1) for _ in labels]
    for g, p in zip(gold, predicted, strict=True):
        if g in index:
            matrix[index[g]][index.get(p, len(labels))] += 1
    return {"labels": labels, "matrix": matrix}


# ---------------------------------------------------------------- extract


def normalise(value: Any) -> Any:
    """A field's value as compared: strings case-folded with runs of white space made one
    and trimmed, 2.0 == 2, "" == null, lists and objects compared whole, normalised."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return int(value) if math.isfinite(value) and float(value).is_integer() else value
    if isinstance(value, str):
        text = " ".join(value.split()).casefold()
        return text or None
    if isinstance(value, list):
        return json.dumps([normalise(v) for v in value])
    if isinstance(value, dict):
        return json.dumps({k: normalise(v) for k, v in value.items()}, sort_keys=True)
    return value


def field_scores(
    expected: Sequence[Mapping[str, Any]], got: Sequence[Mapping[str, Any] | None]
) -> dict[str, Any]:
    """Per-field precision/recall/F1 (slot filling: a wrong value is a false positive and a
    false negative), micro F1 over all fields, exact match of whole rows, and each row's own
    F1 (its quality for the coverage curve). `got` None: the reply was no JSON object."""
    fields = sorted({k for e in expected for k in e})
    counts = {f: [0, 0, 0] for f in fields}  # tp, fp, fn
    exact = []
    row_f1 = []
    for e, g in zip(expected, got, strict=True):
        g = g or {}
        row = [0, 0, 0]
        for f in fields:
            want, have = normalise(e.get(f)), normalise(g.get(f))
            hit = (want == have and want is not None, have is not None and have != want,
                   want is not None and have != want)  # fmt: skip
            for i, h in enumerate(hit):
                counts[f][i] += h
                row[i] += h
        exact.append(all(normalise(e.get(f)) == normalise(g.get(f)) for f in fields))
        # A row with nothing to find and nothing found is perfect, not undefined.
        row_f1.append(_prf(*row)["f1"] if any(row) else 1.0)
    total = [sum(c[i] for c in counts.values()) for i in range(3)]
    return {
        "fields": {f: {**_prf(*c), "support": c[0] + c[2]} for f, c in counts.items()},
        "field_f1": _prf(*total)["f1"],
        "exact_match": sum(exact) / len(exact) if exact else float("nan"),
        "row_exact": exact,
        "row_f1": row_f1,
    }


# ---------------------------------------------------------------- time and tokens


def latency(ms: Sequence[float]) -> dict[str, float]:
    """p50, p99, mean and max in ms (linear between closest ranks; NaN for no samples)."""
    if not ms:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"),
                "mean_ms": float("nan"), "max_ms": float("nan")}  # fmt: skip
    a = np.asarray(ms, np.float64)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "max_ms": float(a.max())}  # fmt: skip
