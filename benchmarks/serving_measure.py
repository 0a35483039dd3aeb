"""How `scripts/bench` times its backends: repeated decodes, one closed-loop client with the
backends taking turns, N concurrent clients, and a CPU hog beside the measurement."""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from benchmarks.procs import Children
from benchmarks.serving_workload import rotate
from benchmarks.stats import dist

now = time.perf_counter


def summarise_decode(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ttft = [r["ttft"] * 1000 for r in runs]
    total = [r["total"] * 1000 for r in runs]
    # as specified: completion_tokens / (total - ttft); and end to end: completion_tokens / total
    dec = [r["tokens"] / (r["total"] - r["ttft"]) for r in runs]
    e2e = [r["tokens"] / r["total"] for r in runs]
    out: dict[str, Any] = {
        "reps": len(runs),
        "completion_tokens": [r["tokens"] for r in runs],
        "finish": sorted({str(r["finish"]) for r in runs}),
        "decode_tok_s": dist(dec),
        "e2e_tok_s": dist(e2e),
        "ttft_ms": dist(ttft),
        "total_ms": dist(total),
        "text_head": runs[-1]["text"][:80] if runs else "",
        "_text": runs[-1]["text"] if runs else "",
    }
    if runs and "server_first_token_ms" in runs[0]:
        out["daemon_measured_first_token_ms"] = dist([r["server_first_token_ms"] for r in runs])
        out["daemon_measured_total_ms"] = dist([r["server_total_ms"] for r in runs])
    return out


def decode_runs(
    run: Callable[[], dict[str, Any]],
    warmup: int,
    reps: int,
    between: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Time `reps` generations after `warmup` ones; summarise TTFT and tokens/s."""
    runs = []
    for i in range(warmup + reps):
        if between is not None:
            between()
        r = run()
        if i >= warmup:
            runs.append(r)
    return summarise_decode(runs)


def one_client(
    fns: dict[str, Callable[[str], int]], seconds: float, prompts: list[str]
) -> dict[str, dict[str, Any]]:
    """One client, back to back, the backends taking turns request by request (same prompt
    in each round, rotating who goes first), so drifting background load hits all alike.
    requests/s = 1 / mean latency: what one closed-loop client gets."""
    lat: dict[str, list[float]] = {k: [] for k in fns}
    toks: dict[str, list[int]] = {k: [] for k in fns}
    end = now() + seconds
    i = 0
    while now() < end:
        prompt = prompts[i % len(prompts)]
        for name in rotate(list(fns), i):
            t = now()
            toks[name].append(fns[name](prompt))
            lat[name].append(now() - t)
        i += 1
    out = {}
    for name in fns:
        busy = sum(lat[name])
        out[name] = {
            "clients": 1,
            "requests": len(lat[name]),
            "elapsed_s": round(busy, 2),
            "req_s": round(len(lat[name]) / busy, 3),
            "completion_tok_s": round(sum(toks[name]) / busy, 1),
            "mean_completion_tokens": round(statistics.fmean(toks[name]), 2),
            "latency_ms": dist([x * 1000 for x in lat[name]], 1),
            "interleaved": True,
        }
    if "daemon" in lat and "in_process" in lat:
        diffs = [(a - b) * 1000 for a, b in zip(lat["daemon"], lat["in_process"], strict=True)]
        out["daemon"]["paired_latency_diff_vs_in_process_ms"] = dist(diffs, 1)
    return out


def load_test(
    make: Callable[[int], Callable[[str], int]], clients: int, duration: float, prompts: list[str]
) -> dict[str, Any]:
    """`clients` threads, each sending requests back to back until `duration` has passed.

    requests/s = completed / (last completion - start): the tail after the deadline counts,
    since the server is still fully busy then; every request that was started is awaited.
    """
    fns = [make(i) for i in range(clients)]  # connect before the clock starts
    lock = threading.Lock()
    counter = [0]
    done: list[tuple[float, float, int]] = []
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)
    start_box = [0.0]

    def worker(fn: Callable[[str], int]) -> None:
        barrier.wait()
        start = start_box[0]
        while now() - start < duration:
            with lock:
                prompt = prompts[counter[0] % len(prompts)]
                counter[0] += 1
            t = now()
            try:
                n = fn(prompt)
            except Exception as e:  # report, do not hang the bench
                with lock:
                    errors.append(f"{type(e).__name__}: {e}"[:200])
                continue
            with lock:
                done.append((now(), now() - t, n))

    threads = [threading.Thread(target=worker, args=(fn,), daemon=True) for fn in fns]
    for t in threads:
        t.start()
    start_box[0] = now()
    barrier.wait()
    for t in threads:
        t.join()
    if not done:
        return {"clients": clients, "requests": 0, "errors": errors[:5]}
    elapsed = max(d[0] for d in done) - start_box[0]
    toks = [d[2] for d in done]
    return {
        "clients": clients,
        "requests": len(done),
        "elapsed_s": round(elapsed, 2),
        "req_s": round(len(done) / elapsed, 3),
        "completion_tok_s": round(sum(toks) / elapsed, 1),
        "mean_completion_tokens": round(statistics.fmean(toks), 2),
        "latency_ms": dist([d[1] * 1000 for d in done], 1),
        "errors": len(errors),
        "error_samples": errors[:3],
    }


@contextmanager
def cpu_hog(children: Children, enabled: bool) -> Iterator[None]:
    """One busy-looping process, pinned nowhere, while the block runs."""
    if not enabled:
        yield
        return
    p = children.spawn([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)
    try:
        yield
    finally:
        children.stop(p, grace=2.0)


def two_streams(
    stream: Callable[[Any], dict[str, Any]], clients: tuple[Any, Any]
) -> dict[str, Any]:
    """Two concurrent streams, one per client: aggregate tokens/s (what two busy apps see)."""
    results: list[dict[str, Any]] = []
    t0 = now()
    th = [threading.Thread(target=lambda cl=cl: results.append(stream(cl))) for cl in clients]
    for t in th:
        t.start()
    for t in th:
        t.join()
    wall = now() - t0
    toks = sum(r["tokens"] for r in results)
    return {
        "wall_s": round(wall, 2),
        "aggregate_tok_s": round(toks / wall, 1),
        "per_stream_total_s": [round(r["total"], 2) for r in results],
        "per_stream_tokens": [r["tokens"] for r in results],
    }
