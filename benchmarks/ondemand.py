"""Load on demand and idle unload: memory and first-request latency, cold vs warm.

A daemon (`sidecar serve`, a subprocess) configured with SmolLM2-135M and Gemma 3 270M as
`load = "on_demand"`. Per model: the daemon tree's RSS and the system's available memory
before the load, while loaded and after `Admin.Unload`; the first request's latency (it
waits for the load: its queue_ms shows the wait) against warm requests; then the keep_alive
unload (the supervisor's idle check, no RPC) and how long after the last request it came.

    python -m benchmarks.ondemand [--workers 1] [--warm 5] [--keep-alive 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import GEMMA, SMOL, Log, machine
from benchmarks.daemon import Daemon
from benchmarks.procs import Children, run
from benchmarks.report import Col, Table, write_json
from sidecar.v1 import inference_pb2 as pb

MiB = 1024 * 1024
log = Log("ondemand")


def tree_rss(pid: int) -> tuple[int, int]:
    """RSS of the daemon process, and the sum over its child processes (the workers, and
    multiprocessing's resource tracker, ~13 MiB, from the first worker on), bytes."""
    p = psutil.Process(pid)
    workers = 0
    for child in p.children(recursive=True):
        try:
            workers += child.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return p.memory_info().rss, workers


def snapshot(pid: int) -> dict[str, float]:
    daemon, workers = tree_rss(pid)
    return {
        "daemon_rss_mib": daemon / MiB,
        "children_rss_mib": workers / MiB,
        "available_mib": psutil.virtual_memory().available / MiB,
    }


def state(c: Any, name: str) -> pb.ModelStatus:
    found: pb.ModelStatus = next(m for m in c.status().models if m.model.name == name)
    return found


def timed(c: Any, name: str) -> dict[str, float]:
    t0 = time.perf_counter()
    reply = c.generate("Say hello.", model=name, max_tokens=8)
    return {
        "client_ms": (time.perf_counter() - t0) * 1000,
        "queue_ms": reply.timings.queue_ms,
        "first_token_ms": reply.timings.first_token_ms,
    }


def measure(d: Daemon, name: str, warm_n: int) -> dict[str, Any]:
    pid = d.proc.pid
    with d.client() as c:
        assert state(c, name).state == "unloaded"
        before = snapshot(pid)
        cold = timed(c, name)
        warm = [timed(c, name) for _ in range(warm_n)]
        loaded = snapshot(pid)
        loaded_state = state(c, name)
        pids = [w.pid for w in loaded_state.workers]
        workers_rss = sum(w.rss_bytes for w in loaded_state.workers)
        t0 = time.perf_counter()
        c.admin.Unload(pb.ResidencyRequest(model=name), metadata=c._md)
        unload_ms = (time.perf_counter() - t0) * 1000
        time.sleep(0.5)  # let the kernel account the freed pages
        after = snapshot(pid)
    return {
        "model": name,
        "before": before,
        "loaded": loaded,
        "after_unload": after,
        "workers_rss_mib": workers_rss / MiB,
        "workers_gone": not any(psutil.pid_exists(p) for p in pids),
        "cold": cold,
        "warm_median_client_ms": statistics.median(w["client_ms"] for w in warm),
        "warm_median_queue_ms": statistics.median(w["queue_ms"] for w in warm),
        "unload_ms": unload_ms,
    }


def keep_alive_run(d: Daemon, name: str, keep_alive: float) -> float:
    """Seconds from the end of the last request to the idle unload being visible."""
    with d.client() as c:
        c.generate("Hi", model=name, max_tokens=1)
        t0 = time.monotonic()
        while state(c, name).state != "unloaded":
            if time.monotonic() - t0 > keep_alive + 30:
                raise RuntimeError("the idle unload did not come")
            time.sleep(0.05)
        return time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--warm", type=int, default=5, help="warm requests per model")
    ap.add_argument("--keep-alive", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=Path("bench-results/bench-ondemand.json"))
    args = ap.parse_args(argv)
    models = {"smollm2": SMOL, "gemma3": GEMMA}
    tables = "".join(
        f'[models.{n}]\npath = "{p}"\nload = "on_demand"\nworkers = {args.workers}\n'
        f"keep_alive = {args.keep_alive}\ncontext = 2048\n"
        for n, p in models.items()
    )
    config = f'default_model = "smollm2"\n[server]\nping_interval_seconds = 0.5\n{tables}'
    results: dict[str, Any] = {"machine": machine(), "workers": args.workers}
    with tempfile.TemporaryDirectory(prefix="bod-", dir="/tmp") as tmp, Children() as ch:
        d = Daemon(ch, Path(tmp), config=config)
        results["daemon_ready_s"] = d.wait_ready()
        log(f"daemon ready in {results['daemon_ready_s']:.2f}s with nothing loaded")
        results["models"] = []
        for name in models:
            log(f"{name}: cold request, {args.warm} warm, unload")
            results["models"].append(measure(d, name, args.warm))
        log(f"keep_alive {args.keep_alive}s: waiting for the idle unload")
        results["keep_alive_s"] = args.keep_alive
        results["idle_unload_after_s"] = keep_alive_run(d, "smollm2", args.keep_alive)
        d.stop()
    t = Table(Col(9), *(Col(w, ">", 1) for w in (7, 8, 8, 7, 8, 8, 8, 7, 7)))
    t.line("RSS in MiB: the daemon process; its children (workers + resource tracker) before")
    t.line("the load, loaded, after the unload; the loaded workers alone (status); avail Δ =")
    t.line("system available memory after the unload minus while loaded")
    t.row("model", "daemon", "before", "loaded", "after", "workers", "avail Δ", "cold ms",
          "(load)", "warm")  # fmt: skip
    t.rule()
    for m in results["models"]:
        t.row(
            m["model"],
            f"{m['loaded']['daemon_rss_mib']:.0f}",
            f"{m['before']['children_rss_mib']:.0f}",
            f"{m['loaded']['children_rss_mib']:.0f}",
            f"{m['after_unload']['children_rss_mib']:.0f}",
            f"{m['workers_rss_mib']:.0f}",
            f"{m['after_unload']['available_mib'] - m['loaded']['available_mib']:+.0f}",
            f"{m['cold']['client_ms']:.0f}",
            f"{m['cold']['queue_ms']:.0f}",
            f"{m['warm_median_client_ms']:.0f}",
        )
    t.line(f"idle unload {results['idle_unload_after_s']:.1f}s after the last request "
           f"(keep_alive {args.keep_alive}s, supervisor tick 0.5s)")  # fmt: skip
    print(t.render())
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
