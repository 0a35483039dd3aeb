"""Soak run: the real daemon on the demo model under mixed traffic from several clients for a
fixed time, with a worker killed on a schedule and the daemon's RSS tracked.

    scripts/soak [--minutes 10] [--clients 4] [--kill-every 30] [--out bench-results/soak.json]

Prints a table and writes JSON: requests served, outcomes by status code, calls slower than
the hang threshold, worker kills and restarts, the daemon's RSS at start, end and peak, and
its exit code after SIGTERM (0: it drained and stopped cleanly).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import psutil

from benchmarks.common import RESULTS, SMOL
from benchmarks.daemon import Daemon
from benchmarks.procs import Children, run
from benchmarks.report import Col, Table, write_json
from sidecar.client import Client

LABELS = ["lost_or_stolen_card", "card_arrival", "exchange_rate", "top_up_failed", "pin_blocked"]
SCHEMA = {
    "type": "object",
    "properties": {"vendor": {"type": "string"}, "total": {"type": "number"}},
}
HUNG_S = 60.0


def client_loop(
    sock: Path, stop: threading.Event, outcomes: Counter[str], slow: list[float], seed: int
) -> None:
    rng = random.Random(seed)
    with Client(sock, caller=f"soak{seed}") as c:
        while not stop.is_set():
            kind = rng.choice(["classify", "generate", "stream", "extract", "embed"])
            t0 = time.monotonic()
            try:
                if kind == "classify":
                    c.classify("I think someone stole my card", LABELS, timeout=HUNG_S)
                elif kind == "generate":
                    c.generate("Write one sentence about the sea.", max_tokens=32, timeout=HUNG_S)
                elif kind == "stream":
                    for _ in c.generate_stream("Once upon a time", max_tokens=48, timeout=HUNG_S):
                        pass
                elif kind == "extract":
                    c.extract(
                        "Invoice from ACME, total 12.50", SCHEMA, max_tokens=64, timeout=HUNG_S
                    )
                else:
                    c.embed(["lost card", "exchange rate"], timeout=HUNG_S)
                outcomes["OK"] += 1
            except grpc.RpcError as e:
                outcomes[e.code().name] += 1
                time.sleep(0.1)
            took = time.monotonic() - t0
            if took >= HUNG_S * 0.9:
                slow.append(took)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="scripts/soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--kill-every", type=float, default=30)
    ap.add_argument("--model", type=Path, default=SMOL)
    ap.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    return ap


def soak(daemon: Daemon, args: argparse.Namespace) -> dict[str, Any]:
    proc = psutil.Process(daemon.proc.pid)
    rss_start = proc.memory_info().rss
    outcomes: Counter[str] = Counter()
    slow: list[float] = []
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=client_loop, args=(daemon.socket, stop, outcomes, slow, i), daemon=True
        )
        for i in range(args.clients)
    ]
    for t in threads:
        t.start()
    end = time.monotonic() + args.minutes * 60
    kills = 0
    rss_samples = [rss_start]
    next_kill = time.monotonic() + args.kill_every
    try:
        with Client(daemon.socket) as admin:
            while time.monotonic() < end:
                time.sleep(1)
                rss_samples.append(proc.memory_info().rss)
                if time.monotonic() >= next_kill:
                    workers = [
                        w
                        for w in admin.status().models[0].workers
                        if w.pid and w.state in ("idle", "busy")
                    ]
                    if workers:
                        os.kill(random.choice(workers).pid, signal.SIGKILL)
                        kills += 1
                    next_kill += args.kill_every
            stop.set()
            for t in threads:
                t.join(timeout=HUNG_S + 5)
            status = admin.status()
    finally:
        stop.set()
    return {
        "minutes": args.minutes,
        "clients": args.clients,
        "worker_kills": kills,
        "worker_restarts": status.models[0].restarts,
        "requests": sum(outcomes.values()),
        "outcomes": dict(outcomes),
        "hung_calls": len(slow),
        "daemon_rss_start_mb": round(rss_start / 2**20, 1),
        "daemon_rss_end_mb": round(proc.memory_info().rss / 2**20, 1),
        "daemon_rss_max_mb": round(max(rss_samples) / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="sc-soak-", dir="/tmp"))  # short socket path
    with Children() as children:
        daemon = Daemon(children, tmp, model=args.model)
        try:
            daemon.wait_ready(timeout=120)
            result = soak(daemon, args)
        finally:
            code = daemon.stop(grace=60)
    result["daemon_exit_code"] = code
    write_json(args.out, result)
    table = Table(Col(24), Col(12, ">"))
    table.row("metric", "value")
    for k, v in result.items():
        if k != "outcomes":
            table.row(k, v)
    for k, n in sorted(result["outcomes"].items()):
        table.row(f"  {k}", n)
    print(table.render())
    print(f"JSON: {args.out}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
