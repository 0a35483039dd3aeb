"""Eval load benchmark: what a running `sidecar eval` costs a concurrent live caller.

    scripts/bench-eval-load                       # this tree's daemon
    scripts/bench-eval-load --baseline /work/main # and another checkout's, in the same run

A real daemon on the demo model (2 workers x 1 thread, as `sidecar serve` runs it on a
small machine). A live caller sends zero-shot Classify requests of the Banking77 mini set
one at a time, a random short gap apart. In the "eval" phases two more threads send the
same kind of request with PRIORITY_LOW back to back, as `sidecar eval` does (concurrency 2),
until the caller's block ends. Phases alternate (alone, eval, alone, eval, ...) and, with
`--baseline`, between the two daemons, so both see the same machine state. The table gives
the caller's latency p50/p99 per daemon and phase, and the eval's rows/s beside it.
`--hogs N` (default 1) runs N busy-looping processes throughout, standing for the other work
of a shared machine: with 2 workers on 2 cores and nothing else running, the eval's worker
takes a core the caller's worker does not need, and costs it little either way.
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import RESULTS, ROOT, SMOL, Log, loadavg, machine
from benchmarks.daemon import Daemon
from benchmarks.procs import Children, run
from benchmarks.report import Col, Table, write_json
from benchmarks.stats import dist

DATA = ROOT / "tests/data/banking77-mini/test.csv"
WARMUP = 3
CONFIG = "[server]\nprobe_interval_seconds = 3600\n"  # no probes among the measured calls

log = Log("bench-eval-load")


def rows() -> tuple[list[str], tuple[str, ...]]:
    with DATA.open(newline="") as f:
        recs = list(csv.DictReader(f))
    labels = tuple(sorted({r["category"] for r in recs}))
    return [r["text"] for r in recs], labels


class Eval:
    """Low-priority Classify requests back to back on `threads` threads until `stop`."""

    def __init__(self, d: Daemon, texts: list[str], labels: tuple[str, ...], threads: int) -> None:
        self.done = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(d, texts[i::threads], labels), daemon=True)
            for i in range(threads)
        ]

    def _run(self, d: Daemon, texts: list[str], labels: tuple[str, ...]) -> None:
        with d.client() as c:
            i = 0
            while not self._stop.is_set():
                c.classify(texts[i % len(texts)], labels, low_priority=True)
                i += 1
                with self._lock:
                    self.done += 1

    def __enter__(self) -> Eval:
        self.t0 = time.perf_counter()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self.wall = time.perf_counter() - self.t0
        for t in self._threads:
            t.join()


def workers(d: Daemon) -> list[psutil.Process]:
    """The daemon's worker processes (spawned children, not multiprocessing's tracker)."""
    kids = psutil.Process(d.proc.pid).children()
    return [k for k in kids if "spawn_main" in " ".join(k.cmdline())]


def cpu(ps: list[psutil.Process]) -> list[float]:
    return [sum(p.cpu_times()[:2]) for p in ps]


def caller(
    d: Daemon, texts: list[str], labels: tuple[str, ...], n: int, seed: int,
    other_cpu: list[float] | None = None,
) -> list[float]:  # fmt: skip
    """`n` live calls; their latencies in ms. `other_cpu` gets, per call, the CPU ms that the
    worker which did not serve it (the busier one served it) burned meanwhile."""
    draw = random.Random(seed)
    out: list[float] = []
    ps = workers(d)
    with d.client() as c:
        for _ in range(n):
            before = cpu(ps)
            t0 = time.perf_counter()
            c.classify(draw.choice(texts), labels)
            out.append((time.perf_counter() - t0) * 1e3)
            used = sorted(b - a for a, b in zip(before, cpu(ps), strict=True))
            if other_cpu is not None and len(used) == 2:
                other_cpu.append(used[0] * 1e3)
            time.sleep(draw.uniform(0.05, 0.3))
    return out


def render(r: dict[str, Any]) -> str:
    t = Table(Col(10), Col(6), Col(6, ">"), Col(9, ">", 0), Col(9, ">", 0), Col(9, ">", 0),
              Col(12, ">", 2))  # fmt: skip
    t.line(f"A live caller's zero-shot Classify ({len(r['labels'])} labels) alone and beside an "
           f"eval (2 low-priority threads); {r['blocks']} blocks of {r['per_block']} calls per "
           "phase, interleaved; "
           f"{r['hogs']} busy-looping process(es) beside")  # fmt: skip
    t.row("daemon", "phase", "calls", "p50 ms", "p99 ms", "mean ms", "eval rows/s")
    t.rule()
    for name, phases in r["latency_ms"].items():
        for phase, d in phases.items():
            rate = r["eval_rows_per_s"].get(name) if phase == "eval" else None
            t.row(name, phase, d["n"], d["p50"], d["p99"], d["mean"], rate if rate else "")
    for name, d in r["eval_worker_cpu_ms_per_live_call"].items():
        t.line(f"{name}: CPU ms the other (eval's) worker burned during each live call beside "
               f"the eval: p50 {d['p50']}, mean {d['mean']}, max {d['max']}")  # fmt: skip
    t.line(f"CPU: {r['machine']['cpu_model']} x {r['machine']['cpus']}; load before "
           f"{r['load_before']}, after {r['load_after']} (shared machine: noisy)")  # fmt: skip
    return t.render()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=20, help="live calls per block")
    ap.add_argument("--blocks", type=int, default=3, help="alone/eval pairs per daemon")
    ap.add_argument("--baseline", type=Path, help="another checkout to run beside this tree")
    ap.add_argument("--hogs", type=int, default=1, help="busy-looping processes beside")
    ap.add_argument("--model", type=Path, default=SMOL)
    ap.add_argument("--out", type=Path, default=RESULTS / "bench-eval-load.json")
    a = ap.parse_args(argv)
    texts, labels = rows()
    trees = {"this": ROOT} | ({"baseline": a.baseline.resolve()} if a.baseline else {})
    tmp = Path(tempfile.mkdtemp(prefix="bel-", dir="/tmp"))
    results: dict[str, Any] = {"labels": labels, "blocks": a.blocks, "hogs": a.hogs, "per_block": a.calls,
                               "trees": {k: str(v) for k, v in trees.items()},
                               "machine": machine(), "load_before": loadavg()}  # fmt: skip
    lat: dict[str, dict[str, list[float]]] = {k: {"alone": [], "eval": []} for k in trees}
    evals: dict[str, list[tuple[int, float]]] = {k: [] for k in trees}
    other: dict[str, list[float]] = {k: [] for k in trees}
    try:
        with Children() as children:
            daemons: dict[str, Daemon] = {}
            for name, tree in trees.items():
                # PYTHONPATH picks the tree's code; PYTHONSAFEPATH keeps `python -m` from
                # putting the working directory (this tree) before it.
                env = {"PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"}
                daemons[name] = Daemon(children, tmp, model=a.model, tag=name, workers=2,
                                       threads=1, config=CONFIG, env=env)  # fmt: skip
            for d in daemons.values():
                d.wait_ready()
            for _ in range(a.hogs):
                children.spawn([sys.executable, "-c", "while True: pass"])
                caller(d, texts, labels, WARMUP, 0)
            for b in range(a.blocks):
                for name, d in daemons.items():
                    log(f"block {b + 1}/{a.blocks}: {name}")
                    lat[name]["alone"] += caller(d, texts, labels, a.calls, b)
                    with Eval(d, texts, labels, 2) as e:
                        lat[name]["eval"] += caller(d, texts, labels, a.calls, b, other[name])
                    evals[name].append((e.done, e.wall))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["load_after"] = loadavg()
    results["latency_ms"] = {n: {p: dist(xs, 1) for p, xs in ph.items()} for n, ph in lat.items()}
    results["eval_worker_cpu_ms_per_live_call"] = {n: dist(xs, 0) for n, xs in other.items()}
    results["eval_rows_per_s"] = {
        n: round(sum(k for k, _ in v) / sum(w for _, w in v), 2) for n, v in evals.items()
    }
    print(render(results))
    write_json(a.out, results)
    log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
