"""Hot-swap benchmark: swap time, and request latency during a swap versus steady state.

    scripts/bench-swap              # the full run (~4-5 minutes on 2 cores)
    scripts/bench-swap --quick      # a ~1.5-minute smoke run
    scripts/bench-swap --out PATH   # JSON somewhere else (default: bench-results/bench-swap.json)

The daemon runs as a subprocess (temporary socket, store and empty config) on SmolLM2-135M.
Gemma 3 270M is added by one warm-up swap to its path and the daemon swapped back (not
measured). Then N client threads keep a steady load on it (alternating Classify with the
six Banking77 labels and a 16-token Generate), recording every request's start, end, status
code and the model version that answered. For each strategy (side_by_side, replace): a
steady window with no swap, then K swaps alternating SmolLM2 <-> Gemma by version, with a
pause after each.

A request is "during swap" if it overlaps [swap request sent, swap finished + 1 s]; every
other request of the phase is "steady". The two models differ in speed (Gemma is about 2x
slower), and a swap window mixes both, so the headline ratio divides the during-swap p99
by the steady p99 of the slower model (pooled steady p99 and the pre-swap window are
reported too). Target: zero errors; side_by_side during-swap p99 <= 2x steady p99.

Every subprocess is stopped on exit, Ctrl-C or error. Only a Unix socket is used.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from benchmarks.common import GEMMA, RESULTS, SMOL, Log, loadavg, machine
from benchmarks.cpu import CpuMeter
from benchmarks.daemon import Daemon
from benchmarks.procs import Children, run
from benchmarks.report import write_json
from benchmarks.swap_report import AFTER_S, Phase, Rec, analyse, stage_times, table
from sidecar.client import Client
from sidecar.v1 import inference_pb2 as pb

LABELS = [
    "lost_or_stolen_card",
    "card_arrival",
    "exchange_rate",
    "top_up_failed",
    "pin_blocked",
    "declined_transfer",
]
TEXT = "I think someone stole my card"
PROMPT = "The weather today is"
GEN_TOKENS = 16
REQ_TIMEOUT = 120.0
STRATEGIES = ("side_by_side", "replace")

now = time.monotonic
log = Log("bench-swap")


class Load:
    """N threads, each with its own channel, sending requests back to back."""

    def __init__(self, sock: Path, clients: int) -> None:
        self.sock = sock
        self.stop_ev = threading.Event()
        self.records: list[Rec] = []
        self.threads = [
            threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(clients)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stop_ev.set()
        for t in self.threads:
            if t.is_alive():
                t.join(REQ_TIMEOUT + 5)

    def _loop(self, i: int) -> None:
        with Client(self.sock, caller=f"bench-swap{i}") as c:
            n = 0
            while not self.stop_ev.is_set():
                n += 1
                kind = "classify" if (n + i) % 2 == 0 else "generate"
                t0 = now()
                try:
                    r: pb.ClassifyReply | pb.GenerateReply
                    if kind == "classify":
                        r = c.classify(TEXT, LABELS, timeout=REQ_TIMEOUT)
                    else:
                        r = c.generate(PROMPT, max_tokens=GEN_TOKENS, timeout=REQ_TIMEOUT)
                    t1 = now()
                    rec = (t0, t1, kind, "OK", r.model.version, r.timings.queue_ms, "")
                except grpc.RpcError as e:
                    t1 = now()
                    rec = (t0, t1, kind, e.code().name, "", -1.0, (e.details() or "")[:200])
                    time.sleep(0.05)  # no hot loop against a refusing daemon
                self.records.append(rec)  # list.append is atomic


def do_swap(c: Client, strategy: str, **target: str) -> dict[str, Any]:
    t0 = now()
    stages: list[dict[str, Any]] = []
    out: dict[str, Any] = {"strategy": strategy, "t0": t0, "ok": False}
    try:
        for p in c.admin.Swap(pb.SwapRequest(strategy=strategy, **target), timeout=600):
            stages.append(
                {
                    "stage": p.stage,
                    "client_ms": round((now() - t0) * 1000, 1),
                    "server_ms": round(p.elapsed_ms, 1),
                    "detail": p.detail,
                }
            )
            if p.finished:
                out.update(ok=p.ok, old=p.old.version, new=p.new.version)
    except grpc.RpcError as e:
        out.update(error=f"{e.code().name}: {e.details()}")
    out["t1"] = now()
    out["swap_ms"] = round((out["t1"] - t0) * 1000, 1)
    out["stages"] = stages
    return out


class Bench:
    def __init__(self, args: argparse.Namespace, children: Children, tmp: Path) -> None:
        self.args = args
        self.children = children
        self.tmp = tmp
        q = args.quick
        self.steady_s = args.steady or (10.0 if q else 40.0)
        self.swaps = args.swaps or (2 if q else 4)
        self.pause_s = args.pause or (12.0 if q else 30.0)
        self.daemon: Daemon | None = None
        self.load: Load | None = None
        self.names: dict[str, str] = {}
        self.cpu = CpuMeter()
        self.res: dict[str, Any] = {
            "config": {
                "quick": q,
                "workers": args.workers,
                "threads": args.threads or "daemon default",
                "clients": args.clients,
                "steady_window_s": self.steady_s,
                "swaps_per_strategy": self.swaps,
                "pause_after_swap_s": self.pause_s,
                "swap_window_extra_s": AFTER_S,
                "mix": f"alternating Classify ({len(LABELS)} labels) / Generate "
                f"(max_tokens={GEN_TOKENS}) per client",
                "models": {"smollm2": str(args.smol), "gemma": str(args.gemma)},
            },
            "host": machine(),
            "loadavg": {"start": loadavg()},
            "strategies": {},
        }

    def run(self) -> None:
        a = self.args
        self.daemon = Daemon(self.children, self.tmp, model=a.smol, workers=a.workers,
                             threads=a.threads)  # fmt: skip
        self.res["startup_s"] = round(self.daemon.wait_ready(), 1)
        log(f"daemon ready in {self.res['startup_s']} s (workers={a.workers})")
        with Client(self.daemon.socket) as c:
            smol = c.status().models[0].model.version
            w = do_swap(c, "side_by_side", path=str(a.gemma))
            if not w["ok"]:
                raise RuntimeError(f"warm-up swap to Gemma failed: {w.get('error')}")
            gem = w["new"]
            back = do_swap(c, "side_by_side", version=smol)
            if not back["ok"]:
                raise RuntimeError(f"warm-up swap back failed: {back.get('error')}")
            log(f"warm-up: add+swap to Gemma {w['swap_ms']:.0f} ms, back {back['swap_ms']:.0f} ms")
            self.res["warmup"] = {"to_gemma": w, "back": back}
            self.names = {smol: "SmolLM2-135M", gem: "Gemma3-270M"}
            self.res["versions"] = self.names
            self.load = Load(self.daemon.socket, a.clients)
            self.load.start()
            time.sleep(3.0)  # connections up, first requests through; not measured
            phases = [(strategy, self.phase(c, strategy)) for strategy in a.strategies]
            self.load.stop()  # every request in flight is recorded before the analysis
            for strategy, (phase, extra) in phases:
                self.res["strategies"][strategy] = (
                    analyse(strategy, phase, self.load.records, self.names) | extra
                )
            st = c.status()
            self.res["final_status"] = {
                "serving": st.models[0].model.version,
                "last_swap": st.models[0].last_swap,
                "restarts": st.models[0].restarts,
                "counters": dict(st.counters),
            }

    def phase(self, c: Client, strategy: str) -> tuple[Phase, dict[str, Any]]:
        start = now()
        self.cpu.mark(strategy)
        la0 = loadavg()
        serving = c.status().models[0].model.version
        log(f"{strategy}: steady window {self.steady_s:.0f} s on {self.names.get(serving)}")
        time.sleep(self.steady_s)
        steady_end = now()
        swaps: list[dict[str, Any]] = []
        for k in range(self.swaps):
            serving = c.status().models[0].model.version
            target = next(v for v in self.names if v != serving)
            sw = do_swap(c, strategy, version=target)
            sw["from"], sw["to"] = serving, target
            swaps.append(sw)
            log(
                f"{strategy}: swap {k + 1}/{self.swaps} {self.names.get(serving)} -> "
                f"{self.names.get(target)}: {'ok' if sw['ok'] else sw.get('error')} "
                f"{sw['swap_ms']:.0f} ms {stage_times(sw['stages'])}"
            )
            time.sleep(self.pause_s)
        end = now()
        self.cpu.mark(None)
        return Phase(start, steady_end, end, swaps), {
            "wall_s": round(end - start, 1),
            "loadavg": {"start": la0, "end": loadavg()},
            "foreign_cpu_cores": self.cpu.sections[strategy]["foreign_cores"],
        }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="scripts/bench-swap",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="~1.5-minute smoke run")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench-swap.json")
    ap.add_argument("--workers", type=int, default=1, help="daemon workers (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads per worker")
    ap.add_argument("--clients", type=int, default=4, help="load client threads (default 4)")
    ap.add_argument("--swaps", type=int, default=None, help="swaps per strategy (4; quick 2)")
    ap.add_argument("--steady", type=float, default=None, help="steady window s (40; quick 10)")
    ap.add_argument("--pause", type=float, default=None, help="s after each swap (30; quick 12)")
    ap.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    ap.add_argument("--smol", type=Path, default=SMOL)
    ap.add_argument("--gemma", type=Path, default=GEMMA)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for p in (args.smol, args.gemma):
        if not p.is_file():
            print(
                f"error: {p} does not exist (scripts/fetch_models.py fetches it)", file=sys.stderr
            )
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="sc-bswap-", dir="/tmp"))  # short socket path
    t0 = now()
    with Children() as children:
        bench = Bench(args, children, tmp)
        failed = False
        try:
            bench.run()
        except BaseException as e:  # recorded in the JSON; re-raised once it is written
            failed = True
            bench.res["error"] = repr(e)
            raise
        finally:
            finish(bench, t0, tmp, failed)
    return 0


def finish(bench: Bench, t0: float, tmp: Path, failed: bool) -> None:
    """Stop the load and the daemon, then write what was measured, even after a failure."""
    if bench.load is not None:
        bench.load.stop_ev.set()
    if bench.daemon is not None:
        bench.res["daemon_exit_code"] = bench.daemon.stop()
    if bench.load is not None:
        bench.load.stop()
    bench.res["loadavg"]["end"] = loadavg()
    bench.res["wall_s"] = round(now() - t0, 1)
    bench.res["completed"] = not failed
    if bench.load is not None:
        base = min((r[0] for r in bench.load.records), default=0.0)
        bench.res["records_header"] = ["start_s", "ms", "kind", "code", "version", "queue_ms"]
        bench.res["records"] = [
            [round(r[0] - base, 3), round((r[1] - r[0]) * 1000, 1), r[2], r[3], r[4],
             round(r[5], 1)]
            for r in bench.load.records
        ]  # fmt: skip
    write_json(bench.args.out, bench.res, indent=1)
    if bench.res["strategies"]:
        try:
            print(table(bench.res, bench.names, bench.args), flush=True)
        except Exception as e:  # a partial run: the JSON has it all
            log(f"no table: {e!r}")
    log(f"wrote {bench.args.out} (wall {bench.res['wall_s']} s)")
    if not failed:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if bench.daemon is not None:
        log(f"daemon log tail:\n{bench.daemon.tail()}")
    log(f"logs kept in {tmp}")


if __name__ == "__main__":
    raise SystemExit(run(main))
