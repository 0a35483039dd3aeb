"""The encrypted store's cost: load time, swap time and memory, encrypted vs plaintext.

For SmolLM2-135M and Gemma 3 270M, one daemon (`sidecar serve`, 2 workers) on a plaintext
store and one on an encrypted store (`store.encryption = true`), run one after the other
on the same machine:
- load: a restart of the daemon until SERVING, the model already in the store (verify,
  then on the encrypted store one decryption into a sealed memfd, then 2 workers load);
- swap: swaps by version between the model and a copy with another general.name (the
  same weights under another sha256), both stored;
- memory: RSS and PSS of the daemon and its workers once serving (PSS splits shared pages,
  so the workers' shared copy of the weights counts once).

    python -m benchmarks.encryption [--restarts 3] [--swaps 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import GEMMA, SMOL, Log, machine
from benchmarks.daemon import Daemon
from benchmarks.procs import Children
from benchmarks.report import Col, Table, write_json
from benchmarks.stats import dist
from sidecar.store.keys import write_new_key
from sidecar.v1 import inference_pb2 as pb
from tests.gguf_variants import metadata_changed

log = Log("encryption")
MiB = 1024 * 1024


def config(model: Path, key: Path | None) -> str:
    store = f'[store]\nencryption = true\nkey_file = "{key}"\n' if key else ""
    return f'{store}[models.default]\npath = "{model}"\nworkers = 2\nthreads = 1\n'


def memory(d: Daemon) -> dict[str, float]:
    root = psutil.Process(d.proc.pid)
    procs = [root, *root.children(recursive=True)]
    rss = pss = 0
    for p in procs:
        info = p.memory_full_info()
        rss += info.rss
        pss += info.pss
    return {"processes": len(procs), "rss_mib": rss / MiB, "pss_mib": pss / MiB}


class Side:
    """One store (plaintext or encrypted) of one model, and its daemon."""

    def __init__(self, ch: Children, tmp: Path, model: Path, key: Path | None) -> None:
        self.ch, self.tmp, self.key = ch, tmp, key
        self.tag = ("enc-" if key else "plain-") + model.stem[:8]
        self.store = tmp / f"store-{self.tag}"
        self.cfg = config(model, key)
        self.d = Daemon(ch, tmp, tag=self.tag, config=self.cfg, store=self.store)
        self.first = self.d.wait_ready()
        variant = metadata_changed(model, tmp / f"{self.tag}-other.gguf", "general.name")
        with self.d.client() as c:
            self.versions = [c.status().models[0].model.version]
            swap = pb.SwapRequest(path=str(variant))
            self.versions.append(list(c.admin.Swap(swap, timeout=600))[-1].new.version)
            list(c.admin.Swap(pb.SwapRequest(version=self.versions[0]), timeout=600))
        self.loads: list[float] = []
        self.swaps: list[float] = []

    def restart(self) -> None:
        self.d.stop()
        self.d = Daemon(self.ch, self.tmp, tag=self.tag, config=self.cfg, store=self.store)
        self.loads.append(self.d.wait_ready())
        log(f"{self.tag}: load {len(self.loads)}: {self.loads[-1]:.2f}s")

    def swap(self) -> None:
        target = self.versions[(len(self.swaps) + 1) % 2]
        with self.d.client() as c:
            t0 = time.monotonic()
            done = list(c.admin.Swap(pb.SwapRequest(version=target), timeout=600))[-1]
            self.swaps.append(time.monotonic() - t0)
        if not done.ok:
            raise RuntimeError(f"swap refused: {done.detail}")
        log(f"{self.tag}: swap {len(self.swaps)}: {self.swaps[-1]:.2f}s")

    def result(self, mem: dict[str, float]) -> dict[str, Any]:
        return {
            "first_start_s": self.first,
            "load_s": dist(self.loads),
            "swap_s": dist(self.swaps),
            "loads": self.loads,
            "swaps": self.swaps,
            "memory": mem,
        }


def run(ch: Children, tmp: Path, model: Path, key: Path, args: Any) -> dict[str, Any]:
    """Plaintext and encrypted side by side, their timings interleaved (A, B, A, B...) so
    that both see the same noise of a shared machine."""
    sides = [Side(ch, tmp, model, None), Side(ch, tmp, model, key)]
    for _ in range(args.restarts):
        for side in sides:
            side.restart()
    mem = {s.tag: memory(s.d) for s in sides}
    for _ in range(args.swaps):
        for side in sides:
            side.swap()
    for side in sides:
        side.d.stop()
    return {
        "plaintext": sides[0].result(mem[sides[0].tag]),
        "encrypted": sides[1].result(mem[sides[1].tag]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="scripts/bench-encryption", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--restarts", type=int, default=3, help="timed loads per store")
    ap.add_argument("--swaps", type=int, default=4, help="timed swaps per store")
    ap.add_argument("--out", type=Path, default=Path("bench-results/bench-encryption.json"))
    args = ap.parse_args(argv)
    results: dict[str, Any] = {"machine": machine(), "models": {}}
    models = [m for m in (SMOL, GEMMA) if m.is_file()]
    with tempfile.TemporaryDirectory(prefix="be-", dir="/tmp") as tmp, Children() as ch:
        d0 = Path(tmp)
        key = d0 / "store.key"
        write_new_key(key)
        for model in models:
            results["models"][model.name] = run(ch, d0, model, key, args)
    t = Table(Col(34), Col(12, ">", 1), Col(12, ">", 1), Col(8, ">", 1))
    t.line("encrypted vs plaintext store, 2 workers (shared, noisy machine: 2 cores)")
    t.row("", "plaintext", "encrypted", "ratio")
    for name, r in results["models"].items():
        p, e = r["plaintext"], r["encrypted"]
        t.rule()
        t.line(name)
        for what, key_ in (("load (restart to SERVING) p50", "load_s"), ("swap p50", "swap_s")):
            a, b = p[key_]["p50"], e[key_]["p50"]
            t.row(f"  {what}", f"{a:.2f}s", f"{b:.2f}s", f"{b / a:.2f}x")
        for what, key_ in (("load p99", "load_s"), ("swap p99", "swap_s")):
            a, b = p[key_]["p99"], e[key_]["p99"]
            t.row(f"  {what}", f"{a:.2f}s", f"{b:.2f}s", f"{b / a:.2f}x")
        for what, key_ in (("RSS daemon+workers", "rss_mib"), ("PSS daemon+workers", "pss_mib")):
            a, b = p["memory"][key_], e["memory"][key_]
            t.row(f"  {what}", f"{a:.0f} MiB", f"{b:.0f} MiB", f"{b / a:.2f}x")
    print(t.render())
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
