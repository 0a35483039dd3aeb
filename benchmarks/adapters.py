"""LoRA adapter benchmark: what an adapter costs a worker on the demo model (SmolLM2-135M).

    scripts/bench-adapters [--runs 12] [--tokens 48] [--out bench-results/bench-adapters.json]

All on one LlamaRunner (the worker's own code: batch, adapter cache, decode steps) in this
process, threads=1, parallel=2, with random rank-8 adapters on the attention projections
(tests/tiny_lora.py), side by side in one run:

- decode tok/s of one greedy generation with no adapter and with one (the adapter's extra
  matrix products per layer);
- switch cost per request: a one-token request whose adapter differs from the previous
  request's (the batch drains, applies the other adapter, drops its shared prefixes) minus
  the same request with the adapter already applied; plus the first load of an adapter a
  worker has not cached (reads the file);
- memory per loaded adapter: this process's RSS growth per adapter loaded (4 loaded), beside
  the file's size;
- delta size between two adapter versions (sidecar's GGUF-aware delta, sidecar.update.delta):
  a retrained adapter (every tensor new) and one retrained on half the layers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import RESULTS, SMOL, Log, loadavg, machine
from benchmarks.report import Col, Table, write_json
from benchmarks.stats import dist
from sidecar.domain.specs import RunnerSpec
from sidecar.domain.types import AdapterFile, GenerateTask, Generation
from sidecar.update.delta import make_delta
from sidecar.worker.runner import LlamaRunner
from tests.tiny_lora import write_lora

log = Log("bench-adapters")
PROMPT = "Write a short note to a colleague about the meeting tomorrow."


def _run(r: LlamaRunner, task: GenerateTask) -> tuple[float, Generation]:
    t0 = time.perf_counter()
    out = r.run(task, None, lambda: False)
    assert isinstance(out, Generation)
    return time.perf_counter() - t0, out


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="scripts/bench-adapters", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=12, help="repeats per measurement")
    p.add_argument("--tokens", type=int, default=48, help="tokens per decode-speed run")
    p.add_argument("--out", type=Path, default=RESULTS / "bench-adapters.json")
    a = p.parse_args(argv)
    if not SMOL.is_file():
        sys.exit(f"{SMOL} is missing: run ./scripts/setup")
    work = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    files = [
        write_lora(work / f"a{i}.gguf", SMOL, rank=8, alpha=16.0, seed=i, std=0.05)
        for i in range(5)
    ]
    adapters = [AdapterFile(f"a{i}", f"{i:064x}", f) for i, f in enumerate(files)]
    log(f"adapters written: {files[0].stat().st_size / 2**20:.2f} MiB each; loading SmolLM2")
    r = LlamaRunner(RunnerSpec(SMOL, 1024, 1, 64, parallel=2))
    load = loadavg()
    try:
        # Decode speed, interleaved so drifting load hits both alike.
        speed: dict[str, list[float]] = {"none": [], "adapter": []}
        texts: dict[str, str] = {}
        for _ in range(a.runs):
            for key, lora in (("none", None), ("adapter", adapters[0])):
                task = GenerateTask(PROMPT, a.tokens, lora=lora)
                s, g = _run(r, task)
                speed[key].append(g.usage.completion_tokens / s)
                texts[key] = g.text
        log("decode speed measured")
        # Switch cost: a one-token request after one of the same adapter vs of another.
        same, switch = [], []
        one = [GenerateTask("Hi", 1, lora=adapters[i]) for i in (0, 1)]
        for _ in range(a.runs * 2):
            _run(r, one[0])
            same.append(_run(r, one[0])[0] * 1000)
            switch.append(_run(r, one[1])[0] * 1000)
        # First load: adapters the worker has not cached (a fresh copy of the file each).
        cold = []
        for i in range(a.runs):
            f = work / f"cold{i}.gguf"
            f.write_bytes(files[2].read_bytes())
            cold.append(
                _run(r, GenerateTask("Hi", 1, lora=AdapterFile(f"c{i}", f"c{i:063x}", f)))[0] * 1000
            )
        log("switch cost measured")
        # Memory: a fresh runner, RSS before and after loading 4 adapters.
        r.close()
        r = LlamaRunner(RunnerSpec(SMOL, 1024, 1, 64, parallel=2))
        _run(r, GenerateTask("Hi", 1))
        before = _rss()
        for lora in adapters[1:5]:
            _run(r, GenerateTask("Hi", 1, lora=lora))
        per_adapter = (_rss() - before) / 4
        log("memory measured")
    finally:
        r.close()
    # Deltas between two versions of one adapter.
    half = write_lora(work / "half.gguf", SMOL, rank=8, alpha=16.0, seed=0, std=0.05)
    _retrain_half(half, files[0], files[1])
    deltas = {}
    for case, new in (("every tensor retrained", files[1]), ("half the layers retrained", half)):
        info = make_delta(files[0], new, work / "d.delta")
        deltas[case] = {
            "delta_bytes": (work / "d.delta").stat().st_size,
            "full_bytes": new.stat().st_size,
        }
        del info
    size = files[0].stat().st_size
    results: dict[str, Any] = {
        "machine": machine(),
        "loadavg_before": load,
        "loadavg_after": loadavg(),
        "model": SMOL.name,
        "adapter": {"rank": 8, "targets": "attn_q/k/v/output, 30 layers", "file_bytes": size},
        "decode_tok_s": {k: dist(v) for k, v in speed.items()},
        "greedy_output_changed": texts["none"] != texts["adapter"],
        "request_ms": {
            "same_adapter": dist(same),
            "switched": dist(switch),
            "first_load": dist(cold),
        },
        "switch_cost_ms_p50": round(dist(switch)["p50"] - dist(same)["p50"], 2),
        "rss_bytes_per_loaded_adapter": int(per_adapter),
        "deltas": deltas,
    }
    t = Table(Col(44), Col(12, ">"), Col(12, ">", 2))
    t.line(f"LoRA adapters on {SMOL.name} (threads=1, one runner in-process; shared, noisy machine, "
           f"load {load} -> {results['loadavg_after']})")  # fmt: skip
    t.row("", "p50", "p99")
    t.rule()
    for key in ("none", "adapter"):
        d = results["decode_tok_s"][key]
        t.row(
            f"decode tok/s, {'no adapter' if key == 'none' else 'with adapter'}", d["p50"], d["p99"]
        )
    for key, label in (("same_adapter", "1-token request, same adapter (ms)"),
                       ("switched", "1-token request, switched adapter (ms)"),
                       ("first_load", "1-token request, first load (ms)")):  # fmt: skip
        d = results["request_ms"][key]
        t.row(label, d["p50"], d["p99"])
    t.row("switch cost per request, p50 difference (ms)", results["switch_cost_ms_p50"])
    t.row(
        "RSS per loaded adapter (MiB)",
        f"{per_adapter / 2**20:.2f}",
        tail=f"   (file {size / 2**20:.2f} MiB)",
    )
    for case, d in deltas.items():
        t.row(f"delta, {case} (KiB)", f"{d['delta_bytes'] / 1024:.0f}",
              tail=f"   (full {d['full_bytes'] / 1024:.0f} KiB)")  # fmt: skip
    t.line(f"greedy output changed by the adapter: {results['greedy_output_changed']}")
    print(t.render())
    write_json(a.out, results)
    log(f"wrote {a.out}")


def _retrain_half(out: Path, v1: Path, v2: Path) -> None:
    """A version whose layers 0-14 are v2's and 15-29 v1's (half the layers retrained)."""
    from gguf import GGUFReader, GGUFWriter

    old, new = GGUFReader(v1), GGUFReader(v2)
    w = GGUFWriter(out, "llama")
    try:
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", 16.0)
        newer = {t.name: t for t in new.tensors}
        for t in old.tensors:
            layer = int(t.name.split(".")[1])
            src = newer[t.name] if layer < 15 else t
            w.add_tensor(t.name, src.data.copy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


if __name__ == "__main__":
    main()
