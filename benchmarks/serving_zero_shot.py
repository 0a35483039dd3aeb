"""`scripts/bench --only zero_shot`: Classify over all 77 Banking77 intents, zero-shot
(no task, no examples: every label scored), on the daemon with its defaults."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from benchmarks.common import Log
from benchmarks.stats import dist

if TYPE_CHECKING:
    from benchmarks.serving import Bench

now = time.perf_counter
log = Log("bench")
TARGET_P50_MS = 1500.0


def run_zero_shot(bench: Bench) -> None:
    bench.mark("zero-shot 77 labels")
    labels = json.loads((bench.a.data.parent / "categories.json").read_text())
    rows = bench.rows[: 3 if bench.a.quick else 8]
    d = bench.daemon(None, None)
    lat: list[float] = []
    right = 0
    with d.client() as c:
        c.classify(rows[0][0], labels)  # warm-up
        for text, cat in rows:
            t = now()
            r = c.classify(text, labels)
            lat.append((now() - t) * 1000)
            right += r.label == cat
    out: dict[str, Any] = {
        "labels": len(labels),
        "latency_ms": dist(lat, 1),
        "accuracy": round(right / len(rows), 3),
        "target_p50_ms": TARGET_P50_MS,
    }
    out["target_met"] = out["latency_ms"]["p50"] <= TARGET_P50_MS
    bench.res["zero_shot_77"] = out
    log(f"zero-shot {len(labels)} labels: p50 {out['latency_ms']['p50']} ms")
