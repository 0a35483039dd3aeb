"""The eval gate's cost: swap time of the demo model with and without `models.NAME.eval`.

Two daemons (`sidecar serve`, subprocesses) on SmolLM2-135M, one without a gate and one
with a golden set of `--rows` Banking77 rows (from tests/data/banking77-mini/test.csv,
round-robin over its 6 intents, zero-shot over those labels; bars that refuse nothing).
Each swaps back and forth between the demo model and a copy with another chat template
(the same weights under another sha256), `--swaps` times after a first swap. The first
gated swap also scores the serving version (cached afterwards), so it is shown apart.

    python -m benchmarks.gate [--swaps 3] [--rows 30] [--out FILE]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, SMOL, Log, machine
from benchmarks.daemon import Daemon
from benchmarks.procs import Children
from benchmarks.report import Col, Table, write_json
from sidecar.v1 import inference_pb2 as pb
from tests.gguf_variants import metadata_changed

log = Log("gate")
SET = ROOT / "tests" / "data" / "banking77-mini" / "test.csv"


def golden(path: Path, rows: int) -> Path:
    """`rows` rows of SET, one intent after another, as text,label."""
    by: dict[str, list[str]] = {}
    with SET.open(newline="") as f:
        for r in csv.DictReader(f):
            by.setdefault(r["category"], []).append(r["text"])
    labels = sorted(by)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(rows):
            label = labels[i % len(labels)]
            w.writerow([by[label][i // len(labels)], label])
    return path


def config(gated: bool, golden_set: Path) -> str:
    task = f'[tasks.bank]\nfile = "{golden_set}"\neval_file = "{golden_set}"\n'
    gate = 'eval = "bank"\neval_min_accuracy = 0\neval_max_regression = 1\n' if gated else ""
    return f'[models.default]\npath = "{SMOL}"\nworkers = 2\nthreads = 1\n{gate}{task}'


def swaps(d: Daemon, files: list[Path], n: int) -> list[dict[str, Any]]:
    c = d.client()
    out = []
    for i in range(n + 1):
        t0 = time.monotonic()
        evals: list[str] = []
        for p in c.admin.Swap(pb.SwapRequest(path=str(files[(i + 1) % 2])), timeout=1200):
            if p.stage == "eval":
                evals.append(f"{time.monotonic() - t0:.1f}s {p.detail}")
            if p.finished and not p.ok:
                raise RuntimeError(f"swap refused: {p.detail}")
        seconds = time.monotonic() - t0
        log(f"swap {i}: {seconds:.2f}s " + " | ".join(evals))
        out.append({"seconds": seconds, "eval": evals})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench-gate", description=__doc__.splitlines()[0])
    ap.add_argument("--swaps", type=int, default=3, help="timed swaps after the first")
    ap.add_argument("--rows", type=int, default=30, help="rows of the golden set (at most 60)")
    ap.add_argument("--out", type=Path, default=Path("bench-results/bench-gate.json"))
    args = ap.parse_args(argv)
    results: dict[str, Any] = {"machine": machine(), "rows": args.rows, "swaps": args.swaps}
    with tempfile.TemporaryDirectory(prefix="bg-", dir="/tmp") as tmp, Children() as ch:
        d0 = Path(tmp)
        files = [SMOL, metadata_changed(SMOL, d0 / "other.gguf")]
        gold = golden(d0 / "golden.csv", args.rows)
        for name, gated in (("without", False), ("with", True)):
            log(f"{name} the gate")
            d = Daemon(ch, d0, tag=name, config=config(gated, gold))
            d.wait_ready()
            results[name] = swaps(d, files, args.swaps)
            d.stop()
    plain = [s["seconds"] for s in results["without"][1:]]
    timed = [s["seconds"] for s in results["with"][1:]]
    results["median_without_s"] = statistics.median(plain)
    results["median_with_s"] = statistics.median(timed)
    results["first_with_s"] = results["with"][0]["seconds"]
    t = Table(Col(44), Col(10, ">", 1), Col(24, "<", 2))
    t.line(f"swap of the demo model, golden set of {args.rows} rows")
    t.row("", "median", "each")
    t.rule()
    t.row("without models.NAME.eval", f"{results['median_without_s']:.2f}s",
          ", ".join(f"{x:.2f}" for x in plain))  # fmt: skip
    t.row("with the gate (serving score cached)", f"{results['median_with_s']:.2f}s",
          ", ".join(f"{x:.2f}" for x in timed))  # fmt: skip
    t.row("with the gate, first (scores serving too)", f"{results['first_with_s']:.2f}s")
    t.line(f"added by the gate: {results['median_with_s'] - results['median_without_s']:.2f}s")
    print(t.render())
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
