"""Routing benchmark: how much of Banking77 the demo model can keep local, and how fast.

    scripts/bench-routing                  # all 3,080 test rows (~5 min after the first run)
    scripts/bench-routing --quick          # 400 test rows
    scripts/bench-routing --label-scoring  # also score the 5 shortlisted labels with the model
    scripts/bench-routing --no-cascade     # run the model for every request
    scripts/bench-routing --draws 0        # skip the out-of-scope part (default: 3 draws)
    scripts/bench-routing --out PATH       # JSON elsewhere (default bench-results/bench-routing.json)
    scripts/bench-routing --with-eval      # and `sidecar eval` on the same rows, side by side

The daemon runs as a subprocess on SmolLM2-135M (2 workers x 1 thread) with one config task,
`banking77`, whose examples are ../shared/data/banking77/train.csv. Everything the
classifier is tuned or calibrated on comes from train.csv (leave-one-out on a held-out
sample of it); test.csv is only classified. Each test row is one Classify(task=banking77,
routing=LOCAL_ONLY) over all 77 intents.

Reported: local accuracy; the accuracy of the requests kept local when the confidence
threshold keeps 50/70/80/90% of them (and the threshold that does it); expected
calibration error (15 equal-width bins); requests/s and p50/p99 latency at 1 and 8
concurrent clients; and the coverage and accuracy the configured default threshold
(cloud.classify_threshold) gives.

Out of scope (`routing_scope`): per draw, 10 intents are left out of the examples and the
test rows of 5 of them are classified as out-of-scope queries, by a task without and a
task with out-of-scope examples (training rows of the other 5, as `none_label` rows).
Reported at the default threshold: out-of-scope rows kept local, in-scope rows kept local
and their accuracy, ECE on in-scope rows, and the AUROC of the novelty signal. The draws'
examples are subsets of train.csv, so their vectors come from the cache (no re-embedding).

The first run embeds the 10k training examples (~6 min on 2 cores); the vectors are cached
in ~/.cache/sidecar/bench-routing-store, so later runs start in seconds.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks import routing_eval
from benchmarks import routing_scope as scope
from benchmarks.common import BANKING77, CACHE, RESULTS, SMOL, Log, machine
from benchmarks.daemon import Daemon
from benchmarks.fanout import each_row
from benchmarks.procs import Children, run
from benchmarks.report import Col, Table, write_json
from benchmarks.stats import percentile
from sidecar.client import Client
from sidecar.config import Overrides, load
from sidecar.evaluation.confidence import (
    at_threshold,
    coverage_curve,
    expected_calibration_error,
    separation,
)
from sidecar.evaluation.scores import macro_f1

STORE = CACHE / "bench-routing-store"
TASK = "banking77"
COVERAGES = (0.5, 0.7, 0.8, 0.9)
TARGETS = {"accuracy": 0.75, "acc@50": 0.95, "acc@80": 0.85, "ece": 0.05, "rps@8": 15.0}

log = Log("bench-routing")


def load_rows(data: Path, name: str) -> list[tuple[str, str]]:
    with (data / name).open(newline="") as f:
        return [(r["text"], r["category"]) for r in csv.DictReader(f)]


def config_text(data: Path, model: Path, label_scoring: bool, cascade: bool) -> str:
    return f"""
[models.demo]
path = "{model}"
workers = 2
threads = 1

[tasks.{TASK}]
file = "{data / "train.csv"}"
text_column = "text"
label_column = "category"
label_scoring = {"true" if label_scoring else "false"}
cascade = {"true" if cascade else "false"}
"""


def wait_task(daemon: Daemon, task: str = TASK, timeout: float = 3600) -> float:
    """Wait until the task's examples are embedded and tuned; seconds it took."""
    started = time.monotonic()
    last = ""
    while time.monotonic() - started < timeout:
        if not daemon.running():
            raise RuntimeError(f"daemon exited {daemon.proc.returncode}:\n{daemon.tail()}")
        if daemon.socket.exists():
            try:
                with Client(daemon.socket, timeout=5) as c:
                    state = c.status().cloud.tasks.get(task, "")
            except grpc.RpcError:
                state = last
            if state != last:
                log(f"task {task}: {state}")
                last = state
            if state == "ready":
                return time.monotonic() - started
            if state.startswith("failed"):
                raise RuntimeError(state)
        time.sleep(1)
    raise RuntimeError("task not ready in time")


def classify_all(
    sock: Path, rows: list[tuple[str, str]], clients: int, task: str = TASK
) -> tuple[list[dict[str, Any]], float]:
    """Classify every row from `clients` threads; (one record per row, wall seconds)."""

    def one(c: Client, row: tuple[str, str]) -> dict[str, Any]:
        text, gold = row
        t0 = time.perf_counter()
        r = c.classify(text, task=task, routing="LOCAL_ONLY", timeout=120)
        ms = (time.perf_counter() - t0) * 1000
        return {"gold": gold, "label": r.label, "p": r.confidence.top_probability,
                "ms": ms, "model": r.usage.prompt_tokens > 0,
                "novelty": r.novelty if r.HasField("novelty") else None,
                "oos": r.out_of_scope}  # fmt: skip

    return each_row(sock, rows, clients, "bench-routing", one)


def latency(res: list[dict[str, Any]], wall: float) -> dict[str, float]:
    ms = [r["ms"] for r in res]
    return {"rps": len(res) / wall, "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99)}


def summarise(
    res8: list[dict[str, Any]],
    wall8: float,
    res1: list[dict[str, Any]],
    wall1: float,
    default_t: float,
) -> dict[str, Any]:
    p = np.array([r["p"] for r in res8], dtype=np.float64)
    ok = np.array([r["label"] == r["gold"] for r in res8], dtype=np.bool_)
    return {
        "rows": len(res8),
        "accuracy": float(ok.mean()),
        "macro_f1": macro_f1([r["gold"] for r in res8], [r["label"] for r in res8]),
        "auroc": separation(p, ok),
        "curve": coverage_curve(p, ok, COVERAGES),
        "ece": expected_calibration_error(p, ok),
        "answered_without_model": float(np.mean([not r["model"] for r in res8])),
        # All 77 intents are in scope here: the share the novelty cut loses.
        "flagged_out_of_scope": float(np.mean([r["oos"] for r in res8])),
        "thresholds": [at_threshold(p, ok, t) for t in (0.5, 0.6, 0.7, 0.8, 0.9)],
        "per_row": [
            {"p": round(r["p"], 5), "ok": r["label"] == r["gold"], "model": r["model"]}
            for r in res8
        ],
        "default_threshold": at_threshold(p, ok, default_t),
        "clients": {"1": latency(res1, wall1), "8": latency(res8, wall8)},
        "targets": TARGETS,
    }


def table(r: dict[str, Any]) -> str:
    t = Table(Col(38), Col(12, ">"), Col(0, gap=3))
    t.line()
    t.line(f"Banking77 test, {r['rows']} rows, 77 labels, SmolLM2-135M (label scoring "
           f"{'on' if r['label_scoring'] else 'off'}, cascade {'on' if r['cascade'] else 'off'})")  # fmt: skip
    t.row("metric", "value", "target")
    t.row("local accuracy", f"{r['accuracy']:.3f}", ">= 0.75")
    for c in r["curve"]:
        target = {0.5: ">= 0.95", 0.8: ">= 0.85"}.get(c["coverage"], "")
        t.row(f"accuracy kept local @ {c['coverage']:.0%} (t={c['threshold']:.3f})",
              f"{c['accuracy']:.3f}", target)  # fmt: skip
    t.row("macro-F1", f"{r['macro_f1']:.3f}", "")
    t.row("expected calibration error", f"{r['ece']:.3f}", "<= 0.05")
    t.row("AUROC of the confidence", f"{r['auroc']:.3f}", "")
    t.row("answered from the words alone (cascade)", f"{r['answered_without_model']:.3f}", "")
    t.row("in-scope rows flagged out_of_scope", f"{r['flagged_out_of_scope']:.3f}", "")
    for th in r["thresholds"]:
        t.row(f"threshold {th['threshold']}: coverage / accuracy",
              f"{th['coverage']:.3f} / {th['accuracy']:.3f}", "")  # fmt: skip
    d = r["default_threshold"]
    t.row(f"default threshold {d['threshold']}: coverage", f"{d['coverage']:.3f}", "")
    t.row(f"default threshold {d['threshold']}: accuracy", f"{d['accuracy']:.3f}", "")
    for n, c in r["clients"].items():
        t.row(f"{n} client(s): requests/s", f"{c['rps']:.1f}", ">= 15" if n == "8" else "")
        t.row(f"{n} client(s): p50 / p99 ms", f"{c['p50_ms']:.0f} / {c['p99_ms']:.0f}", "")
    return t.render()


def run_draws(
    d: Daemon,
    draws: list[scope.Draw],
    test: list[tuple[str, str]],
    in_scope: int,
    threshold: float,
) -> list[dict[str, Any]]:
    """Each draw's two tasks (without, with none examples) over the same queries."""
    out = []
    for draw in draws:
        rows = scope.queries(test, draw, in_scope)
        one: dict[str, Any] = {"scored": draw.scored, "none": draw.none}
        for with_none in (False, True):
            name = draw.task(with_none)
            log(f"draw {draw.index}: {name}, {len(rows)} rows")
            res, _ = classify_all(d.socket, rows, 8, name)
            one["with_none" if with_none else "without_none"] = scope.summarise(res, threshold)
        out.append(one)
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="scripts/bench-routing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="400 of the test rows")
    ap.add_argument("--label-scoring", action="store_true")
    ap.add_argument("--no-cascade", action="store_true", help="run the model for every request")
    ap.add_argument(
        "--draws", type=int, default=3, help="out-of-scope draws (intents left out); 0 = skip"
    )
    ap.add_argument(
        "--with-eval",
        action="store_true",
        help="after the bench's passes, run `sidecar eval` on the same rows and daemon, and "
        "print both reports' figures side by side (also in the JSON, under sidecar_eval)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "bench-routing.json")
    ap.add_argument("--data", type=Path, default=BANKING77, help="Banking77 train.csv, test.csv")
    ap.add_argument("--model", type=Path, default=SMOL)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    test = load_rows(args.data, "test.csv")
    if args.quick:
        test = test[:: max(1, len(test) // 400)][:400]
    tmp = Path(tempfile.mkdtemp(prefix="sc-brouting-", dir="/tmp"))  # short socket path
    # Absolute: the daemon resolves relative paths in its config against the config's folder.
    data, model = args.data.resolve(), args.model.resolve()
    config = config_text(data, model, args.label_scoring, not args.no_cascade)
    train = load_rows(data, "train.csv")
    draws = scope.draws(sorted({y for _, y in train}), args.draws)
    for draw in draws:  # after banking77: their vectors are its vectors
        config += scope.write_tasks(tmp, train, draw, not args.no_cascade)[0]
    # The threshold the daemon uses is whatever this config gives it: read it the same way.
    (tmp / "effective.toml").write_text(config)
    default_t = load(Overrides(config=tmp / "effective.toml"), env={}).cloud.classify_threshold
    with Children() as children:
        d = Daemon(children, tmp, config=config, store=STORE)
        try:
            prep_s = wait_task(d)
            for draw in draws:  # fitted before anything is timed: no background work then
                for with_none in (False, True):
                    wait_task(d, draw.task(with_none))
            log(f"task ready after {prep_s:.0f}s; classifying {len(test)} test rows, 8 clients")
            res8, wall8 = classify_all(d.socket, test, 8)
            n1 = min(len(test), 300)
            log(f"1 client, {n1} rows")
            res1, wall1 = classify_all(d.socket, test[:n1], 1)
            if args.with_eval:
                rows_csv = tmp / "eval-rows.csv"
                routing_eval.write_rows(rows_csv, test)
                cmd = routing_eval.command(tmp / "effective.toml", d.socket, rows_csv, TASK, 8)
                log(f"sidecar eval on the same {len(test)} rows: {' '.join(cmd[1:])}")
                evaluated, eval_wall = routing_eval.run_eval(cmd)
            in_scope = 400 if args.quick else 10**6
            oos = run_draws(d, draws, load_rows(data, "test.csv"), in_scope, default_t)
        finally:
            d.stop()
    report = {
        "machine": machine(),
        "label_scoring": args.label_scoring,
        "cascade": not args.no_cascade,
        "task_prepare_s": round(prep_s, 1),
        **summarise(res8, wall8, res1, wall1, default_t),
    }
    if args.with_eval:
        joined = routing_eval.join(report, evaluated)
        head = {"rows": len(test), "task": TASK, "eval_wall_s": eval_wall,
                "bench_rps": report["clients"]["8"]["rps"], "eval_rps": evaluated["rows_per_s"]}  # fmt: skip
        report["sidecar_eval"] = {"command": cmd[1:], **head, "comparison": joined,
                                  "verdict": routing_eval.verdict(joined), "report": evaluated}  # fmt: skip
    if draws:
        report["out_of_scope"] = {
            "threshold": default_t,
            "draws": oos,
            "without_none": scope.average([o["without_none"] for o in oos]),
            "with_none": scope.average([o["with_none"] for o in oos]),
            "targets": scope.TARGETS,
        }
    print(table(report))
    if args.with_eval:
        print(routing_eval.table(report["sidecar_eval"]["comparison"], report["sidecar_eval"]))
    if draws:
        print(scope.table(report["out_of_scope"]))
    write_json(args.out, report)
    log(f"wrote {args.out}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
