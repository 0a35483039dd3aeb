"""`scripts/bench --only transport`: what the real daemon adds around a request.

One client, sequential one-token Generates on the demo model: each call's client latency
minus the daemon's own `timings.total_ms` (request received -> reply ready) is the socket,
gRPC, peer-credential relay and client cost. (`benchmarks/transport.py` measures the same
on the fake engine, row by row; this is the figure beside the real model.)
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from benchmarks.common import Log
from benchmarks.stats import dist

if TYPE_CHECKING:
    from benchmarks.serving import Bench

now = time.perf_counter
log = Log("bench")
TARGET_P50_MS = 1.0


def run_transport(bench: Bench) -> None:
    bench.mark("transport")
    d = bench.daemon(None, None)
    calls = 100 if bench.a.quick else 300
    prompt = "The capital of France is"
    over: list[float] = []
    served: list[float] = []
    with d.client() as c:
        for i in range(20 + calls):
            t = now()
            r = c.generate(prompt, max_tokens=1)
            ms = (now() - t) * 1000
            if i >= 20:  # after a warm-up
                over.append(ms - r.timings.total_ms)
                served.append(r.timings.total_ms)
    out: dict[str, Any] = {
        "call": "Generate(max_tokens=1), one client, sequential",
        "daemon_shape": "the daemon's defaults",
        "overhead_ms": dist(over, 3),
        "daemon_total_ms": dist(served, 3),
        "target_p50_ms": TARGET_P50_MS,
    }
    out["target_met"] = out["overhead_ms"]["p50"] <= TARGET_P50_MS
    bench.res["transport"] = out
    log(f"transport overhead p50 {out['overhead_ms']['p50']} ms, p99 {out['overhead_ms']['p99']}")
