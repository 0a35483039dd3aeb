"""Soak run: mixed traffic for a fixed time, worker kills on a schedule, daemon RSS tracked.

Prints a table and writes JSON: requests served, errors by status code, calls slower than
the hang threshold, worker restarts, and the daemon's RSS at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar.client import Client

ROOT = Path(__file__).resolve().parent.parent
LABELS = ["lost_or_stolen_card", "card_arrival", "exchange_rate", "top_up_failed", "pin_blocked"]
SCHEMA = {
    "type": "object",
    "properties": {"vendor": {"type": "string"}, "total": {"type": "number"}},
}
HUNG_S = 60.0


def model_path() -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/fetch_models.py"), "--path", "smollm2"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--kill-every", type=float, default=30)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results/soak.json")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sc-soak-", dir="/tmp"))
    sock = tmp / "s.sock"
    log = (tmp / "daemon.log").open("w")
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar.cli",
            "serve",
            "--socket",
            str(sock),
            "--model",
            model_path(),
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with Client(sock, timeout=2) as c:
                    if c.health("sidecar.v1.Inference") == "SERVING":
                        break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit("daemon did not become ready")
            time.sleep(0.2)
        proc = psutil.Process(daemon.pid)
        rss_start = proc.memory_info().rss
        outcomes: Counter[str] = Counter()
        slow: list[float] = []
        stop = threading.Event()
        threads = [
            threading.Thread(target=client_loop, args=(sock, stop, outcomes, slow, i), daemon=True)
            for i in range(args.clients)
        ]
        for t in threads:
            t.start()
        end = time.monotonic() + args.minutes * 60
        kills = 0
        rss_samples = []
        next_kill = time.monotonic() + args.kill_every
        with Client(sock) as admin:
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
        rss_end = proc.memory_info().rss
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(60)
        log.close()

    served = sum(outcomes.values())
    result = {
        "minutes": args.minutes,
        "clients": args.clients,
        "worker_kills": kills,
        "worker_restarts": status.models[0].restarts,
        "requests": served,
        "outcomes": dict(outcomes),
        "hung_calls": len(slow),
        "daemon_rss_start_mb": round(rss_start / 2**20, 1),
        "daemon_rss_end_mb": round(rss_end / 2**20, 1),
        "daemon_rss_max_mb": round(max(rss_samples) / 2**20, 1),
        "daemon_exit_code": code,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'metric':<24}{'value':>12}")
    for k, v in result.items():
        if k != "outcomes":
            print(f"{k:<24}{v!s:>12}")
    for k, v in sorted(outcomes.items()):
        print(f"  {k:<22}{v:>12}")
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
