"""Threads per decode step: fixed 1, fixed 2, or chosen by the core governor (not a test).

    scripts/bench-cores             # ~3 minutes on 2 cores
    scripts/bench-cores --quick     # a ~1-minute smoke run
    scripts/bench-cores --out PATH  # JSON somewhere else (default: bench-results/bench-cores.json)

Each stream is a subprocess running a plain llama_cpp.Llama loop on the demo model: the
story prompt, then 128 greedy tokens one llm.eval() at a time, the thread count set with
llama_set_n_threads before each step (fixed 1, fixed 2, or `CoreGovernor.threads()`, as a
worker would). Decode tok/s excludes the prompt. Measured:

- one stream on the idle machine and beside one CPU hog (a busy-looping process), the three
  modes interleaved in one process, rotating who goes first;
- two concurrent streams (two processes, like two busy workers of the daemon): fixed 2
  against governed, taking turns.

A run that collapses stops after a time budget; its tok/s counts the tokens it reached.
Targets: governed idle >= 0.95x fixed-2 idle; governed beside the hog >= 0.9x fixed-1 idle.
The report says how many cores other processes took during each section: on a shared
machine "idle" is only as idle as that. `--nice -20` (root, Linux) gives the bench's own
processes, the hog among them, that scheduling priority (each runs in its own session, so
it sets each one's autogroup): on a machine busy with unrelated work they then see an
almost idle machine, the hog their only equal. Every subprocess is stopped on exit or Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, SMOL, Log, loadavg, machine
from benchmarks.cpu import CpuMeter
from benchmarks.procs import Children, run
from benchmarks.report import Col, Table, write_json
from benchmarks.serving_workload import DECODE_TOKENS, STORY, rotate
from sidecar.worker.cores import Capacity, Sample

MODES = ["fixed1", "fixed2", "governed", "scoped"]
FIXED = {"fixed1": 1, "fixed2": 2}
BUDGET_S = 12.0  # per 128-token run: a collapsed run (0.7 tok/s) would take minutes
now = time.perf_counter
log = Log("bench-cores")


# ------------------------------------------------------------------ one stream (child)


class ScopedReader:
    """The governor's view of a machine that runs only this benchmark's processes (mode
    "scoped"): others are the pids listed in `scope` (the hog, a sibling stream), read from
    /proc/PID/stat. On a machine busy with unrelated work, run under --nice so that work
    barely runs, this emulates an idle machine for the governor, which otherwise counts that
    work (at nice 0 in /proc/stat) as competition, rightly, and keeps to one thread."""

    def __init__(self, scope: Path) -> None:
        self.scope = scope
        self.hz = os.sysconf("SC_CLK_TCK")

    def capacity(self) -> Capacity:
        return Capacity(len(os.sched_getaffinity(0)))

    def sample(self) -> Sample:
        own = time.process_time()
        others, running = 0.0, 1
        with suppress(OSError):
            for pid in {int(x) for x in self.scope.read_text().split()} - {os.getpid()}:
                with suppress(OSError):
                    stat = Path(f"/proc/{pid}/stat").read_text()
                    rest = stat[stat.rindex(")") + 2 :].split()
                    others += (int(rest[11]) + int(rest[12])) / self.hz  # utime, stime
                    running += rest[0] == "R"
        return Sample(time.monotonic(), own + others, own, None, running)

    def runnable(self) -> int:
        return self.sample().running

    def own_running(self) -> int:
        return 1


def stream(
    model: Path, modes: list[str], reps: int, tokens: int, budget: float, scope: Path | None
) -> dict[str, Any]:
    """Decode tok/s per mode (`reps` runs each, interleaved) and the governed thread counts."""
    import llama_cpp
    import numpy as np

    from sidecar.worker.cores import CoreGovernor, resolve_max_threads

    top = max(2, resolve_max_threads(0))
    llm = llama_cpp.Llama(
        model_path=str(model),
        n_ctx=512,
        n_batch=512,
        n_ubatch=512,
        n_threads=top,
        n_threads_batch=top,
        seed=0,
        verbose=False,
    )
    ctx = llm._ctx.ctx
    n_vocab = llm.n_vocab()
    prompt = llm.tokenize(STORY.encode(), add_bos=True)
    # one per process, for its lifetime, as in a worker
    governors = {"governed": CoreGovernor(top)}
    if scope is not None:
        governors["scoped"] = CoreGovernor(top, reader=ScopedReader(scope))
    current = 0

    def set_threads(n: int) -> None:
        nonlocal current
        if n != current:
            llama_cpp.llama_set_n_threads(ctx, n, n)
            current = n

    rates: dict[str, list[float]] = {m: [] for m in modes}
    steps: dict[str, collections.Counter[int]] = {m: collections.Counter() for m in governors}
    for rep in range(reps):
        for mode in rotate(modes, rep):
            gov = governors.get(mode)
            set_threads(gov.threads() if gov else FIXED[mode])
            llm.n_tokens = 0  # eval() drops the cache beyond this point
            llm.eval(prompt)
            n, t0 = 0, now()
            while n < tokens and now() - t0 < budget:
                if gov:
                    set_threads(gov.threads())
                    steps[mode][current] += 1
                logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
                llm.eval([int(np.argmax(logits))])
                n += 1
            rates[mode].append(n / (now() - t0))
    llm.close()
    used = {m: dict(c) for m, c in steps.items() if m in modes}
    return {"tok_s": rates, "steps_by_threads": used}


# ------------------------------------------------------------------ the parent


class Bench:
    def __init__(self, args: argparse.Namespace, children: Children, tmp: Path) -> None:
        self.a, self.children, self.tmp = args, children, tmp
        self.meter = CpuMeter()
        self.res: dict[str, Any] = {}
        self.scope = tmp / "scope"  # the pids a "scoped" governor counts as others

    def spawn(self, cmd: list[str], logfile: Path | None = None) -> subprocess.Popen[bytes]:
        p = self.children.spawn(cmd, logfile)
        if self.a.nice:
            # A child leads its own session, so its autogroup is its own: its nice is the
            # priority CFS gives the child against the rest of the machine.
            Path(f"/proc/{p.pid}/autogroup").write_text(str(self.a.nice))
        return p

    @contextmanager
    def hog(self, enabled: bool) -> Iterator[None]:
        """One busy-looping process, pinned nowhere, at the bench's priority."""
        if not enabled:
            yield
            return
        p = self.spawn([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
        try:
            yield
        finally:
            self.children.stop(p, grace=2.0)

    def streams(self, modes: list[str], count: int) -> list[dict[str, Any]]:
        """`count` concurrent stream processes running `modes`; their results."""
        cmd = [sys.executable, "-m", "benchmarks.cores", "--child", ",".join(modes)]
        cmd += ["--reps", str(self.a.reps), "--model", str(self.a.model)]
        cmd += ["--tokens", str(self.a.tokens)]
        cmd += ["--scope", str(self.scope)]
        logs = [self.tmp / f"stream-{time.monotonic_ns()}-{i}.log" for i in range(count)]
        procs = [self.spawn(cmd, lf) for lf in logs]
        self.scope.write_text(" ".join(str(p.pid) for p in self.children.procs))
        for p in procs:
            p.wait()
        out = []
        for p, lf in zip(procs, logs, strict=True):
            lines = [x for x in lf.read_text().splitlines() if x.startswith("RESULT ")]
            if p.returncode != 0 or not lines:
                raise RuntimeError(f"stream exited {p.returncode}: {lf.read_text()[-2000:]}")
            out.append(json.loads(lines[-1][7:]))
            self.children.stop(p)
        return out

    def single(self, cond: str) -> None:
        self.meter.mark(f"single {cond}")
        with self.hog(cond == "hog"):
            la = loadavg()
            r = self.streams(MODES, 1)[0]
        self.meter.mark(None)
        self.res.setdefault("single", {})[cond] = {**r, "loadavg": la}
        med = {m: round(statistics.median(v), 1) for m, v in r["tok_s"].items()}
        log(f"single {cond}: {med} steps by threads {r['steps_by_threads']}")

    def pair(self) -> None:
        out: dict[str, Any] = {}
        for rnd in range(self.a.rounds):
            for mode in rotate(["fixed2", "governed", "scoped"], rnd):
                self.meter.mark(f"two streams {mode} #{rnd}")
                rs = self.streams([mode], 2)
                self.meter.mark(None)
                agg = sum(statistics.median(r["tok_s"][mode]) for r in rs)
                e = out.setdefault(mode, {"aggregate_tok_s": [], "streams": []})
                e["aggregate_tok_s"].append(round(agg, 1))
                e["streams"].append(rs)
                log(f"two streams {mode} #{rnd}: {agg:.1f} tok/s together")
        self.res["two_streams"] = out


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    med: dict[str, Any] = {}
    for cond, r in res["single"].items():
        for mode, xs in r["tok_s"].items():
            med[f"{mode} {cond}"] = round(statistics.median(xs), 1)
    for mode, r in res.get("two_streams", {}).items():
        med[f"{mode} two streams"] = round(statistics.median(r["aggregate_tok_s"]), 1)

    def ratio(a: str, b: str) -> float | None:
        return round(med[a] / med[b], 2) if med.get(a) and med.get(b) else None

    return {
        "median_tok_s": med,
        "ratios": {
            "governed idle / fixed2 idle (target >= 0.95)": ratio("governed idle", "fixed2 idle"),
            "scoped idle / fixed2 idle (target >= 0.95)": ratio("scoped idle", "fixed2 idle"),
            "governed hog / fixed1 idle (target >= 0.9)": ratio("governed hog", "fixed1 idle"),
            "scoped hog / fixed1 idle (target >= 0.9)": ratio("scoped hog", "fixed1 idle"),
            "fixed2 hog / fixed1 idle (the collapse)": ratio("fixed2 hog", "fixed1 idle"),
            "governed two streams / fixed2 two streams": ratio(
                "governed two streams", "fixed2 two streams"
            ),
            "scoped two streams / fixed2 two streams": ratio(
                "scoped two streams", "fixed2 two streams"
            ),
        },
    }


def table(res: dict[str, Any]) -> str:
    s = res["summary"]
    m = s["median_tok_s"]
    t = Table(Col(28), *(Col(10, ">", gap=1) for _ in MODES))
    t.line(f"bench-cores: {Path(res['model']).name}, {res['tokens']}-token greedy decode,")
    t.line(
        f"{res['machine']['cpu_model']} ({res['machine']['cpus']} CPUs), median tok/s"
        + (f", bench processes at nice {res['nice']}" if res.get("nice") else "")
    )
    t.line("governed: the whole machine's load; scoped: only the bench's processes count")
    t.row("", "fixed 1", "fixed 2", "governed", "scoped")
    t.rule()
    for cond, name in (("idle", "one stream, idle"), ("hog", "one stream, beside a hog")):
        t.row(name, *(m.get(f"{mode} {cond}", "-") for mode in MODES))
    t.row("two streams (together)", "-", *(m.get(f"{x} two streams", "-") for x in MODES[1:]))
    t.line()
    for k, v in s["ratios"].items():
        t.line(f"{k}: {v}")
    t.line()
    t.line("cores used by other processes per section (shared machine):")
    for k, v in res["cpu"].items():
        t.line(f"  {k}: {v['foreign_cores']}")
    return t.render()


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="scripts/bench-cores",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--model", type=Path, default=SMOL)
    ap.add_argument("--tokens", type=int, default=DECODE_TOKENS)
    ap.add_argument("--reps", type=int, default=0, help="runs per mode and stream")
    ap.add_argument("--rounds", type=int, default=0, help="two-stream rounds per mode")
    ap.add_argument("--nice", type=int, default=0, help="the bench processes' priority (root)")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench-cores.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # run one stream: these modes
    ap.add_argument("--scope", type=Path, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    a.reps = a.reps or (2 if a.quick else 5)
    a.rounds = a.rounds or (1 if a.quick else 2)
    if a.child:
        r = stream(a.model, a.child.split(","), a.reps, a.tokens, BUDGET_S, a.scope)
        print("RESULT " + json.dumps(r), flush=True)
        return 0
    if not a.model.exists():
        print(f"no model at {a.model}: run scripts/setup", file=sys.stderr)
        return 2
    with Children() as children, tempfile.TemporaryDirectory(prefix="bench-cores-") as tmp:
        b = Bench(a, children, Path(tmp))
        b.res.update(
            {
                "model": str(a.model),
                "tokens": a.tokens,
                "reps": a.reps,
                "nice": a.nice,
                "machine": machine(),
            }
        )
        try:
            b.single("idle")
            b.single("hog")
            b.pair()
        finally:
            b.meter.mark(None)
            b.res["cpu"] = b.meter.sections
            if "single" in b.res:
                b.res["summary"] = summarise(b.res)
                write_json(a.out, b.res)
    print(table(b.res))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
