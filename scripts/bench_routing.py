"""Routing benchmark: how much of Banking77 the demo model can keep local, and how fast.

    scripts/bench-routing                  # all 3,080 test rows (~5 min after the first run)
    scripts/bench-routing --quick          # 400 test rows
    scripts/bench-routing --label-scoring  # also score the 5 shortlisted labels with the model
    scripts/bench-routing --no-cascade     # run the model for every request
    scripts/bench-routing --out PATH       # JSON elsewhere (default bench-results/bench-routing.json)

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
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from sidecar.client import Client  # noqa: E402
from sidecar.config import CLOUD_KEYS  # noqa: E402
from sidecar.fewshot.classifier import expected_calibration_error  # noqa: E402

DATA = ROOT.parent / "shared/data/banking77"
SMOL = Path.home() / ".cache/sidecar/models/SmolLM2-135M-Instruct.Q4_1.gguf"
STORE = Path.home() / ".cache/sidecar/bench-routing-store"
COVERAGES = (0.5, 0.7, 0.8, 0.9)
TARGETS = {"accuracy": 0.75, "acc@50": 0.95, "acc@80": 0.85, "ece": 0.05, "rps@8": 15.0}


def log(msg: str) -> None:
    print(f"[bench-routing {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load(name: str) -> list[tuple[str, str]]:
    with (DATA / name).open(newline="") as f:
        return [(r["text"], r["category"]) for r in csv.DictReader(f)]


class Daemon:
    def __init__(self, tmp: Path, label_scoring: bool, cascade: bool) -> None:
        self.socket = tmp / "d.sock"
        self.logfile = tmp / "daemon.log"
        config = tmp / "bench.toml"
        config.write_text(
            f"""
[models.demo]
path = "{SMOL}"
workers = 2
threads = 1

[tasks.banking77]
file = "{DATA / "train.csv"}"
text_column = "text"
label_column = "category"
label_scoring = {"true" if label_scoring else "false"}
cascade = {"true" if cascade else "false"}
"""
        )
        cmd = [sys.executable, "-m", "sidecar.cli", "--config", str(config), "serve"]
        cmd += ["--socket", str(self.socket), "--store", str(STORE)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        with open(self.logfile, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=out, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )  # fmt: skip

    def wait_task(self, timeout: float = 3600) -> float:
        started = time.monotonic()
        last = ""
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.tail()}")
            if self.socket.exists():
                with Client(self.socket, timeout=5) as c, suppress(grpc.RpcError):
                    state = c.status().cloud.tasks.get("banking77", "")
                    if state != last:
                        log(f"task banking77: {state}")
                        last = state
                    if state == "ready":
                        return time.monotonic() - started
                    if state.startswith("failed"):
                        raise RuntimeError(state)
            time.sleep(1)
        raise RuntimeError("task not ready in time")

    def tail(self, n: int = 30) -> str:
        with suppress(OSError):
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def classify_all(
    sock: Path, rows: list[tuple[str, str]], clients: int
) -> tuple[list[dict[str, Any]], float]:
    out: list[dict[str, Any] | None] = [None] * len(rows)
    nxt = iter(range(len(rows)))
    lock = threading.Lock()

    def worker() -> None:
        with Client(sock, caller="bench-routing") as c:
            while True:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                text, gold = rows[i]
                t0 = time.perf_counter()
                r = c.classify(text, task="banking77", routing="LOCAL_ONLY", timeout=120)
                ms = (time.perf_counter() - t0) * 1000
                out[i] = {"gold": gold, "label": r.label, "p": r.confidence.top_probability,
                          "ms": ms, "model": r.usage.prompt_tokens > 0}  # fmt: skip

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return [r for r in out if r is not None], wall


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else 0.0


def curve(p: np.ndarray, ok: np.ndarray) -> list[dict[str, float]]:
    order = np.argsort(-p, kind="stable")
    rows = []
    for cov in COVERAGES:
        n = round(cov * len(p))
        rows.append({"coverage": cov, "accuracy": float(ok[order[:n]].mean()),
                     "threshold": float(p[order[n - 1]])})  # fmt: skip
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--label-scoring", action="store_true")
    ap.add_argument("--no-cascade", action="store_true", help="run the model for every request")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results/bench-routing.json")
    args = ap.parse_args()
    test = load("test.csv")
    if args.quick:
        test = test[:: max(1, len(test) // 400)][:400]
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
        d = Daemon(Path(tmp), args.label_scoring, not args.no_cascade)
        try:
            prep_s = d.wait_task()
            log(f"task ready after {prep_s:.0f}s; classifying {len(test)} test rows, 8 clients")
            res8, wall8 = classify_all(d.socket, test, 8)
            n1 = min(len(test), 300)
            log(f"1 client, {n1} rows")
            res1, wall1 = classify_all(d.socket, test[:n1], 1)
        finally:
            d.stop()
    p = np.array([r["p"] for r in res8])
    ok = np.array([r["label"] == r["gold"] for r in res8])
    default_t = float(CLOUD_KEYS["classify_threshold"].default)
    kept = p >= default_t
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "rows": len(res8),
        "label_scoring": args.label_scoring,
        "cascade": not args.no_cascade,
        "task_prepare_s": round(prep_s, 1),
        "accuracy": float(ok.mean()),
        "curve": curve(p, ok),
        "ece": expected_calibration_error(p, ok),
        "answered_without_model": float(np.mean([not r["model"] for r in res8])),
        "thresholds": [
            {
                "threshold": t,
                "coverage": float((p >= t).mean()),
                "accuracy": float(ok[p >= t].mean()) if (p >= t).any() else 0.0,
            }
            for t in (0.5, 0.6, 0.7, 0.8, 0.9)
        ],
        "per_row": [
            {"p": round(r["p"], 5), "ok": r["label"] == r["gold"], "model": r["model"]}
            for r in res8
        ],
        "default_threshold": {
            "threshold": default_t,
            "coverage": float(kept.mean()),
            "accuracy": float(ok[kept].mean()) if kept.any() else 0.0,
        },
        "clients": {
            "1": {
                "rps": n1 / wall1,
                "p50_ms": pct([r["ms"] for r in res1], 50),
                "p99_ms": pct([r["ms"] for r in res1], 99),
            },
            "8": {
                "rps": len(res8) / wall8,
                "p50_ms": pct([r["ms"] for r in res8], 50),
                "p99_ms": pct([r["ms"] for r in res8], 99),
            },
        },
        "targets": TARGETS,
    }
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    log(f"wrote {args.out}")
    return 0


def print_table(r: dict[str, Any]) -> None:
    def row(name: str, value: str, target: str) -> None:
        print(f"{name:<38}{value:>12}   {target}")

    print(f"\nBanking77 test, {r['rows']} rows, 77 labels, SmolLM2-135M (label scoring "
          f"{'on' if r['label_scoring'] else 'off'}, cascade {'on' if r['cascade'] else 'off'})")  # fmt: skip
    row("metric", "value", "target")
    row("local accuracy", f"{r['accuracy']:.3f}", ">= 0.75")
    for c in r["curve"]:
        target = {0.5: ">= 0.95", 0.8: ">= 0.85"}.get(c["coverage"], "")
        row(f"accuracy kept local @ {c['coverage']:.0%} (t={c['threshold']:.3f})",
            f"{c['accuracy']:.3f}", target)  # fmt: skip
    row("expected calibration error", f"{r['ece']:.3f}", "<= 0.05")
    row("answered from the words alone (cascade)", f"{r['answered_without_model']:.3f}", "")
    for t in r["thresholds"]:
        row(f"threshold {t['threshold']}: coverage / accuracy",
            f"{t['coverage']:.3f} / {t['accuracy']:.3f}", "")  # fmt: skip
    d = r["default_threshold"]
    row(f"default threshold {d['threshold']}: coverage", f"{d['coverage']:.3f}", "")
    row(f"default threshold {d['threshold']}: accuracy", f"{d['accuracy']:.3f}", "")
    for n, c in r["clients"].items():
        row(f"{n} client(s): requests/s", f"{c['rps']:.1f}", ">= 15" if n == "8" else "")
        row(f"{n} client(s): p50 / p99 ms", f"{c['p50_ms']:.0f} / {c['p99_ms']:.0f}", "")


if __name__ == "__main__":
    raise SystemExit(main())
