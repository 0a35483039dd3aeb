"""`scripts/bench-routing --with-eval`: `sidecar eval` beside the bench, on the same rows.

After the bench's own passes, the real CLI (`python -m sidecar.cli eval run ... --json`, a
subprocess, as a user would run it) scores the bench's test rows (written to a CSV in the
same order) by the same config task against the same running daemon. The two reports are
then joined figure by figure: accuracy, macro-F1, ECE, AUROC, the accuracy (and threshold)
of the surest 50/70/80/90%, and what the daemon's threshold keeps. Both sides compute their
figures with sidecar.evaluation's functions, so a difference comes from the replies (which
rows, which answers, which confidence), not from the arithmetic. Throughput is shown but not
diffed: the eval runs at low priority, on a machine shared with others.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.daemon import clean_env
from benchmarks.report import Col, Table

# Figures this close are the same figure (float sums in a different order at most).
SAME = 1e-9


def write_rows(path: Path, rows: list[tuple[str, str]]) -> None:
    """The bench's rows as the CSV `sidecar eval` reads, in the bench's order (columns of
    Banking77's own file, which the task's text_column and label_column name)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "category"])
        w.writerows(rows)


def command(config: Path, socket: Path, rows_csv: Path, task: str, concurrency: int) -> list[str]:
    return [sys.executable, "-m", "sidecar.cli", "--config", str(config), "eval", "run",
            str(rows_csv), "--task", task, "--socket", str(socket), "--json",
            "--concurrency", str(concurrency), "--timeout", "120"]  # fmt: skip


def run_eval(cmd: list[str]) -> tuple[dict[str, Any], float]:
    """The CLI's JSON report, and the wall seconds the command took (start-up included)."""
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"sidecar eval exited {done.returncode}:\n{done.stderr[-2000:]}")
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError as e:
        raise RuntimeError(f"sidecar eval printed no JSON ({e}):\n{done.stdout[:500]}") from None
    return report, wall


def _num(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def join(bench: dict[str, Any], ev: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure both report: {metric, bench, eval, diff} (diff: |bench - eval|,
    None when either side has no value). Coverage points are matched by their coverage."""
    conf, q = ev["confidence"], ev["quality"]
    counts: list[tuple[str, Any, Any]] = [
        ("rows", bench["rows"], ev["rows"]),
        ("rows with a local confidence", len(bench["per_row"]), conf["rows"]),
        # The bench stops at a failed request; the eval counts it as wrong and goes on.
        ("failed + unanswered requests", 0, ev["failed"] + ev["unanswered"]),
    ]
    pairs: list[tuple[str, Any, Any]] = [
        ("accuracy", bench["accuracy"], q["accuracy"]),
        ("macro-F1", bench["macro_f1"], q["macro_f1"]),
        ("expected calibration error", bench["ece"], conf["ece"]),
        ("AUROC (right vs wrong)", bench["auroc"], conf["auroc"]),
    ]
    theirs = {round(c["coverage"], 6): c for c in conf["coverage"]}
    for mine in bench["curve"]:
        other = theirs.get(round(mine["coverage"], 6), {})
        cov = f"{mine['coverage']:.0%}"
        pairs.append((f"accuracy of the surest {cov}", mine["accuracy"], other.get("accuracy")))
        pairs.append((f"  threshold keeping {cov}", mine["threshold"], other.get("threshold")))
    d, t = bench["default_threshold"], conf["at_threshold"]
    pairs += [
        ("daemon's threshold", d["threshold"], t["threshold"]),
        ("  kept local at it", d["coverage"], t["coverage"]),
        ("  accuracy of those kept", d["accuracy"], t["accuracy"]),
    ]
    out = []
    for n, (metric, a, b) in enumerate(counts + pairs):
        x, y = _num(a), _num(b)
        diff = abs(x - y) if x is not None and y is not None else None
        out.append(
            {"metric": metric, "bench": x, "eval": y, "diff": diff, "count": n < len(counts)}
        )
    return out


def verdict(rows: list[dict[str, Any]]) -> str:
    """ "identical", or which figures differ (a missing value on one side differs too)."""
    off = [r["metric"].strip() for r in rows if r["diff"] is None or r["diff"] > SAME]
    return "identical" if not off else "differ: " + ", ".join(off)


def _cell(x: float | None, count: bool) -> str:
    if x is None:
        return "n/a"
    return str(int(x)) if count else f"{x:.4f}"


def table(rows: list[dict[str, Any]], head: dict[str, Any]) -> str:
    """`head`: rows, the eval's command line and wall time, both throughputs."""
    t = Table(Col(34), Col(14, ">"), Col(14, ">", gap=2), Col(10, ">", gap=2))
    t.line()
    t.line(f"bench-routing vs sidecar eval: the same {head['rows']} Banking77 test rows, "
           f"task {head['task']}, one daemon")  # fmt: skip
    t.row("metric", "bench-routing", "sidecar eval", "|diff|")
    t.rule()
    for r in rows:
        diff = "n/a" if r["diff"] is None else f"{r['diff']:.2g}"
        t.row(r["metric"], _cell(r["bench"], r["count"]), _cell(r["eval"], r["count"]), diff)
    t.row("requests/s (eval: low priority)", f"{head['bench_rps']:.1f}",
          f"{head['eval_rps']:.1f}", "not diffed")  # fmt: skip
    # engine/pool.py keeps one worker free of background work for live callers.
    t.line("  (low priority: on at most all workers but one, 1 of 2 here; a shared machine)")
    t.line(f"verdict: {verdict(rows)}")
    t.line(f"sidecar eval took {head['eval_wall_s']:.0f}s (CLI start-up included)")
    return t.render()
