"""Out of scope on Banking77: whole intents left out of the examples, their test rows
classified as questions none of the labels cover (part of scripts/bench-routing).

Each draw (seeded, so every run scores the same rows) leaves `LEFT_OUT` of the 77 intents
out of the task's examples and splits them in two halves:

- the *scored* half: their test rows are the out-of-scope queries; no task ever sees any
  of their rows, train or test;
- the *none* half: only in the "with none examples" task, `NONE_PER` training rows of each
  become rows labelled with the task's `none_label`. Their test rows are never scored, so
  the out-of-scope examples are never the out-of-scope queries (a user's out-of-scope
  examples are other questions than the ones that will come).

Per draw two tasks run on the same daemon: `oosD` (in-scope examples only) and `oosDn`
(the same plus the none rows). In-scope queries are the test rows of the remaining
intents. Reported at the default threshold, where AUTO keeps an answer local when its
confidence is at least the threshold and it is not out of scope: the share of
out-of-scope rows kept local (and what it would be on confidence alone), the share of
in-scope rows kept local and their accuracy, ECE on in-scope rows, and the AUROC of the
novelty signal (in-scope vs out-of-scope).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import Col, Table
from sidecar.evaluation.confidence import auroc, expected_calibration_error

LEFT_OUT = 10  # intents left out per draw
NONE_PER = 30  # training rows of each "none" intent given as out-of-scope examples
NONE_LABEL = "__none__"
TARGETS = {"oos_kept": 0.05, "in_kept": 0.85, "in_kept_accuracy": 0.95, "ece": 0.05}
# Other operating points, from the same replies (novelty = 1 - p, out of scope when p < alpha).
SWEEP_THRESHOLDS = (0.5, 0.6, 0.7, 0.8)
SWEEP_ALPHAS = (0.05, 0.1, 0.2, 0.3)


@dataclass(frozen=True)
class Draw:
    index: int
    scored: tuple[str, ...]  # intents whose test rows are the out-of-scope queries
    none: tuple[str, ...]  # intents whose training rows are the none examples

    @property
    def left_out(self) -> set[str]:
        return {*self.scored, *self.none}

    def task(self, with_none: bool) -> str:
        return f"oos{self.index}{'n' if with_none else ''}"


def draws(intents: list[str], n: int) -> list[Draw]:
    out = []
    for d in range(n):
        rng = np.random.default_rng(1000 + d)
        left = [intents[i] for i in rng.choice(len(intents), LEFT_OUT, replace=False)]
        half = LEFT_OUT // 2
        out.append(Draw(d, tuple(left[:half]), tuple(left[half:])))
    return out


def write_tasks(
    folder: Path, train: list[tuple[str, str]], draw: Draw, cascade: bool = True
) -> tuple[str, list[str]]:
    """The two tasks' CSV files and their TOML tables; (toml, task names)."""
    kept = [(t, y) for t, y in train if y not in draw.left_out]
    per: dict[str, int] = {}
    none = []
    for t, y in train:
        if y in draw.none and per.get(y, 0) < NONE_PER:
            per[y] = per.get(y, 0) + 1
            none.append((t, NONE_LABEL))
    toml = ""
    names = []
    for with_none, rows in ((False, kept), (True, kept + none)):
        name = draw.task(with_none)
        path = folder / f"{name}.csv"
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "category"])
            w.writerows(rows)
        toml += f"""
[tasks.{name}]
file = "{path}"
text_column = "text"
label_column = "category"
none_label = "{NONE_LABEL if with_none else ""}"
cascade = {"true" if cascade else "false"}
"""
        names.append(name)
    return toml, names


def queries(test: list[tuple[str, str]], draw: Draw, in_scope: int) -> list[tuple[str, str]]:
    """In-scope test rows (every k-th, at most `in_scope`), then every scored intent's rows;
    an out-of-scope row's gold label is ""."""
    inside = [(t, y) for t, y in test if y not in draw.left_out]
    inside = inside[:: max(1, len(inside) // in_scope)][:in_scope]
    outside = [(t, "") for t, y in test if y in draw.scored]
    return inside + outside


def summarise(records: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """One task's figures at `threshold`: records carry gold ("" = out of scope), label,
    p (top probability), novelty, oos (the reply's out_of_scope)."""
    gold = np.array([r["gold"] for r in records])
    outside = gold == ""
    p = np.array([r["p"] for r in records])
    oos = np.array([r["oos"] for r in records], bool)
    nov = np.array([r["novelty"] if r["novelty"] is not None else np.nan for r in records])
    ok = np.array([r["label"] == r["gold"] for r in records], bool)
    kept = (p >= threshold) & ~oos
    inside = ~outside
    return {
        "in_rows": int(inside.sum()),
        "oos_rows": int(outside.sum()),
        "oos_kept": float(kept[outside].mean()),
        "oos_kept_confidence_only": float((p >= threshold)[outside].mean()),
        "oos_flagged": float(oos[outside].mean()),
        "in_flagged": float(oos[inside].mean()),
        "in_kept": float(kept[inside].mean()),
        "in_kept_accuracy": float(ok[inside & kept].mean()) if (inside & kept).any() else 0.0,
        "in_accuracy": float(ok[inside].mean()),
        "ece": expected_calibration_error(p[inside], ok[inside]),
        "auroc": auroc(nov[inside], nov[outside]),
        "auroc_confidence": auroc(-p[inside], -p[outside]),
        "sweep": sweep(p, nov, oos, ok, outside),
    }


def sweep(
    p: np.ndarray, nov: np.ndarray, oos: np.ndarray, ok: np.ndarray, outside: np.ndarray
) -> dict[str, dict[str, float]]:
    """Kept local and its accuracy at other (classify_threshold, scope_alpha) pairs. A
    larger alpha flags every row the default flags (its none-example rule included) and
    those whose novelty passes 1 - alpha."""
    out = {}
    inside = ~outside
    novelty = np.nan_to_num(nov, nan=0.0)  # unmeasured: never past a cut
    for t in SWEEP_THRESHOLDS:
        for a in SWEEP_ALPHAS:
            kept = (p >= t) & ~(oos | (novelty > 1 - a))
            out[f"t{t}_a{a}"] = {
                "oos_kept": float(kept[outside].mean()),
                "in_kept": float(kept[inside].mean()),
                "in_kept_accuracy": float(ok[inside & kept].mean())
                if (inside & kept).any()
                else 0.0,
            }
    return out


def average(parts: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in parts[0].items() if isinstance(v, float)]
    out: dict[str, Any] = {k: float(np.mean([p[k] for p in parts])) for k in keys}
    if all("sweep" in p for p in parts):
        out["sweep"] = {
            point: {k: float(np.mean([p["sweep"][point][k] for p in parts])) for k in v}
            for point, v in parts[0]["sweep"].items()
        }
    return out


def table(r: dict[str, Any]) -> str:
    t = Table(Col(44), Col(14, ">"), Col(14, ">"), Col(0, gap=3))
    t.line()
    t.line(
        f"Out of scope: {LEFT_OUT} of 77 intents left out, {len(r['draws'])} draws (half "
        f"scored as out of scope, half as {NONE_PER} none examples each in the 'with' task); "
        f"threshold {r['threshold']}, scope_alpha default"
    )
    t.row("metric (mean over draws)", "without none", "with none", "target")
    rows = [
        ("out-of-scope rows kept local", "oos_kept", "<= 0.05"),
        ("... on confidence alone (no novelty)", "oos_kept_confidence_only", ""),
        ("out-of-scope rows flagged out_of_scope", "oos_flagged", ""),
        ("in-scope rows kept local", "in_kept", ">= 0.85"),
        ("accuracy of in-scope rows kept local", "in_kept_accuracy", ">= 0.95"),
        ("in-scope rows flagged out_of_scope", "in_flagged", ""),
        ("in-scope accuracy (all rows)", "in_accuracy", ""),
        ("ECE on in-scope rows", "ece", "<= 0.05"),
        ("AUROC of novelty", "auroc", ""),
        ("AUROC of 1 - confidence (for comparison)", "auroc_confidence", ""),
    ]
    a, b = r["without_none"], r["with_none"]
    for name, key, target in rows:
        t.row(name, f"{a[key]:.3f}", f"{b[key]:.3f}", target)
    if "sweep" in a:
        t.line("other operating points (without none examples): out-of-scope kept / in-scope "
               "kept / accuracy of in-scope kept")  # fmt: skip
        for th in SWEEP_THRESHOLDS:
            cells = []
            for al in SWEEP_ALPHAS:
                x = a["sweep"][f"t{th}_a{al}"]
                cells.append(
                    f"a={al}: {x['oos_kept']:.2f}/{x['in_kept']:.2f}/{x['in_kept_accuracy']:.2f}"
                )
            t.line(f"  threshold {th}  " + "  ".join(cells))
    return t.render()
