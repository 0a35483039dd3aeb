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
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import suppress
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import psutil  # noqa: E402

from sidecar.client import Client  # noqa: E402
from sidecar.v1 import inference_pb2 as pb  # noqa: E402

MODELS = Path.home() / ".cache/sidecar/models"
SMOL = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = MODELS / "gemma-3-270m-q4_k_m.gguf"
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
AFTER_S = 1.0  # a swap's window extends this long past its end
MIN_N = 5  # fewer steady samples of a model than this: not used as the ratio's base
REQ_TIMEOUT = 120.0
STRATEGIES = ("side_by_side", "replace")

now = time.monotonic
# start, end, kind, status code, model version, daemon queue ms, error detail
Rec = tuple[float, float, str, str, str, float, str]


def log(msg: str) -> None:
    print(f"[bench-swap {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def pct(xs: list[float], q: float) -> float | None:
    s = sorted(xs)
    if not s:
        return None
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def dist(xs: list[float]) -> dict[str, Any]:
    if not xs:
        return {"n": 0}
    return {
        "n": len(xs),
        "p50": round(pct(xs, 50) or 0, 1),
        "p99": round(pct(xs, 99) or 0, 1),
        "max": round(max(xs), 1),
        "mean": round(statistics.fmean(xs), 1),
    }


# ---------------------------------------------------------------- daemon


class Daemon:
    def __init__(self, tmp: Path, model: Path, workers: int, threads: int | None) -> None:
        self.socket = tmp / "d.sock"
        self.logfile = tmp / "daemon.log"
        config = tmp / "empty.toml"  # never the user's config file
        config.write_text("")
        cmd = [sys.executable, "-m", "sidecar.cli", "--config", str(config), "serve"]
        cmd += ["--socket", str(self.socket), "--store", str(tmp / "store")]
        cmd += ["--model", str(model), "--workers", str(workers)]
        if threads:
            cmd += ["--threads", str(threads)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        with open(self.logfile, "wb") as out:
            # Own session: a Ctrl-C reaches only the bench, which then stops the daemon.
            self.proc = subprocess.Popen(
                cmd,
                stdout=subprocess.DEVNULL,
                stderr=out,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = now() + timeout
        while now() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.tail()}")
            if self.socket.exists():
                with Client(self.socket, timeout=2) as c, suppress(grpc.RpcError):
                    if c.health("sidecar.v1.Inference") == "SERVING":
                        return
            time.sleep(0.1)
        raise RuntimeError(f"daemon not SERVING after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        with suppress(OSError):
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def tree_cpu_s(self) -> float:
        """CPU seconds used by this bench, the daemon and its workers (living or reaped)."""
        t = os.times()
        total = t.user + t.system
        with suppress(psutil.Error):
            p = psutil.Process(self.proc.pid)
            c = p.cpu_times()
            total += c.user + c.system + c.children_user + c.children_system
            for ch in p.children(recursive=True):
                with suppress(psutil.Error):
                    cc = ch.cpu_times()
                    total += cc.user + cc.system
        return total


def busy_cpu_s() -> float:
    c = psutil.cpu_times()
    return sum(c) - c.idle - getattr(c, "iowait", 0.0)


# ---------------------------------------------------------------- load


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
            t.join(REQ_TIMEOUT + 5)

    def _loop(self, i: int) -> None:
        with Client(self.sock, caller=f"bench-swap{i}") as c:
            n = 0
            while not self.stop_ev.is_set():
                n += 1
                kind = "classify" if (n + i) % 2 == 0 else "generate"
                t0 = now()
                try:
                    if kind == "classify":
                        r: Any = c.classify(TEXT, LABELS, timeout=REQ_TIMEOUT)
                    else:
                        r = c.generate(PROMPT, max_tokens=GEN_TOKENS, timeout=REQ_TIMEOUT)
                    t1 = now()
                    rec = (t0, t1, kind, "OK", r.model.version, r.timings.queue_ms, "")
                except grpc.RpcError as e:
                    t1 = now()
                    rec = (t0, t1, kind, e.code().name, "", -1.0, (e.details() or "")[:200])
                    time.sleep(0.05)  # no hot loop against a refusing daemon
                self.records.append(rec)  # list.append is atomic


# ---------------------------------------------------------------- swaps


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


def stage_times(stages: list[dict[str, Any]]) -> dict[str, float]:
    """ms spent in each stage (until the next one started), from the server's clock."""
    out: dict[str, float] = {}
    for a, b in itertools.pairwise(stages):
        out[a["stage"]] = round(out.get(a["stage"], 0) + b["server_ms"] - a["server_ms"], 1)
    return out


# ---------------------------------------------------------------- bench


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        q = args.quick
        self.steady_s = args.steady or (10.0 if q else 40.0)
        self.swaps = args.swaps or (2 if q else 4)
        self.pause_s = args.pause or (12.0 if q else 30.0)
        self.daemon: Daemon | None = None
        self.load: Load | None = None
        self.names: dict[str, str] = {}
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
            "host": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "loadavg": {"start": loadavg()},
            "strategies": {},
        }

    def run(self) -> None:
        a = self.args
        t0 = now()
        self.daemon = Daemon(self.tmp, a.smol, a.workers, a.threads)
        self.daemon.wait_ready()
        self.res["startup_s"] = round(now() - t0, 1)
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
            for strategy, (raw, extra) in phases:
                self.res["strategies"][strategy] = self.analyse(strategy, *raw) | extra
            st = c.status()
            self.res["final_status"] = {
                "serving": st.models[0].model.version,
                "last_swap": st.models[0].last_swap,
                "restarts": st.models[0].restarts,
                "counters": dict(st.counters),
            }

    def phase(self, c: Client, strategy: str) -> tuple[tuple, dict[str, Any]]:
        assert self.load is not None and self.daemon is not None
        start = now()
        cpu0, tree0 = busy_cpu_s(), self.daemon.tree_cpu_s()
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
        wall = end - start
        foreign = (busy_cpu_s() - cpu0 - (self.daemon.tree_cpu_s() - tree0)) / wall
        return (start, steady_end, end, swaps), {
            "wall_s": round(wall, 1),
            "loadavg": {"start": la0, "end": loadavg()},
            "foreign_cpu_cores": round(max(foreign, 0.0), 2),
        }

    def analyse(
        self, strategy: str, start: float, steady_end: float, end: float, swaps: list[dict]
    ) -> dict[str, Any]:
        assert self.load is not None
        recs = [r for r in list(self.load.records) if start <= r[0] < end]
        windows = [(s["t0"], s["t1"] + AFTER_S) for s in swaps]

        def during(r: Rec) -> bool:
            return any(r[0] < w1 and r[1] > w0 for w0, w1 in windows)

        def ms(r: Rec) -> float:
            return (r[1] - r[0]) * 1000

        swap_recs = [r for r in recs if during(r)]
        steady_recs = [r for r in recs if not during(r)]

        def ok(rs: list[Rec]) -> list[Rec]:
            return [r for r in rs if r[3] == "OK"]

        steady_by_ver = {v: dist([ms(r) for r in ok(steady_recs) if r[4] == v]) for v in self.names}
        # The slower model by steady p50, among models with enough steady samples to say.
        slower = max(
            (v for v in self.names if steady_by_ver[v]["n"] >= MIN_N),
            key=lambda v: steady_by_ver[v]["p50"],
            default=None,
        )
        for s in swaps:
            news = [r[1] for r in recs if r[3] == "OK" and r[4] == s["to"] and r[1] >= s["t0"]]
            s["first_new_reply_ms"] = round((min(news) - s["t0"]) * 1000, 1) if news else None
            s["stage_ms"] = stage_times(s["stages"])
            s["requests_in_window"] = sum(
                1 for r in recs if r[0] < s["t1"] + AFTER_S and r[1] > s["t0"]
            )
        errors = Counter(r[3] for r in recs if r[3] != "OK")
        error_samples: dict[str, str] = {}
        for r in recs:
            if r[3] != "OK":
                error_samples.setdefault(r[3], r[6])
        during_d = dist([ms(r) for r in ok(swap_recs)])
        steady_d = dist([ms(r) for r in ok(steady_recs)])
        pre = [r for r in recs if r[1] <= steady_end and r[3] == "OK"]
        pre_d = dist([ms(r) for r in pre])
        slow_p99 = steady_by_ver[slower]["p99"] if slower else None

        def ratio(a: Any, b: Any) -> float | None:
            return round(a / b, 2) if a and b else None

        ok_swaps = [s for s in swaps if s["ok"]]
        swap_ms = [s["swap_ms"] for s in ok_swaps]
        first = [s["first_new_reply_ms"] for s in ok_swaps if s["first_new_reply_ms"] is not None]
        by_kind = {
            kind: {
                "steady": dist([ms(r) for r in ok(steady_recs) if r[2] == kind]),
                "during_swap": dist([ms(r) for r in ok(swap_recs) if r[2] == kind]),
            }
            for kind in ("classify", "generate")
        }
        q_during = [r[5] for r in ok(swap_recs)]
        q_steady = [r[5] for r in ok(steady_recs)]
        out = {
            "swaps_ok": len(ok_swaps),
            "swaps_total": len(swaps),
            "swap_ms": {
                "median": round(statistics.median(swap_ms), 1) if swap_ms else None,
                "max": max(swap_ms) if swap_ms else None,
            },
            "request_to_first_new_version_reply_ms": {
                "median": round(statistics.median(first), 1) if first else None,
                "max": max(first) if first else None,
            },
            "requests": {
                "total": len(recs),
                "steady": len(steady_recs),
                "during_swap": len(swap_recs),
            },
            "steady_ms": steady_d,
            "steady_ms_by_version": {self.names[v]: d for v, d in steady_by_ver.items()},
            "pre_swap_window_ms": pre_d,
            "during_swap_ms": during_d,
            "by_kind_ms": by_kind,
            "daemon_queue_ms": {"steady": dist(q_steady), "during_swap": dist(q_during)},
            "slower_model": self.names.get(slower or "", None),
            "ratio_during_p99_over_slower_model_steady_p99": ratio(during_d.get("p99"), slow_p99),
            "ratio_during_p99_over_pooled_steady_p99": ratio(
                during_d.get("p99"), steady_d.get("p99")
            ),
            "ratio_during_p99_over_pre_swap_window_p99": ratio(
                during_d.get("p99"), pre_d.get("p99")
            ),
            "errors": dict(errors),
            "error_samples": error_samples,
            "swaps": [
                {k: v for k, v in s.items() if k not in ("t0", "t1")}
                | {"t0_s": round(s["t0"] - start, 2), "t1_s": round(s["t1"] - start, 2)}
                for s in swaps
            ],
        }
        headline = out["ratio_during_p99_over_slower_model_steady_p99"]
        out["target_zero_errors_met"] = not errors and len(ok_swaps) == len(swaps)
        if strategy == "side_by_side":
            out["target_p99_within_2x_met"] = headline is not None and headline <= 2.0
        return out

    # ------------------------------------------------------------ report

    def table(self) -> str:
        r = self.res
        c = r["config"]
        st = r["strategies"]
        names = list(st)
        lines = [
            "",
            f"sidecar bench-swap{' (QUICK)' if c['quick'] else ''}: workers={c['workers']} "
            f"threads={c['threads']}, {c['clients']} clients ({c['mix']}); "
            f"loadavg start {r['loadavg']['start']} end {r['loadavg'].get('end')}",
            f"per strategy: {c['steady_window_s']:.0f} s steady window, then "
            f"{c['swaps_per_strategy']} swaps SmolLM2<->Gemma with {c['pause_after_swap_s']:.0f} s "
            f"after each; 'during swap' = overlapping [request, finished + {AFTER_S:.0f} s]",
        ]
        w0, w = 50, 22
        lines.append("metric".ljust(w0) + "".join(n.ljust(w) for n in names))
        lines.append("-" * (w0 - 1) + " " + " ".join("-" * (w - 1) for _ in names))

        def f(x: Any, nd: int = 0) -> str:
            if x is None:
                return "n/a"
            return f"{x:.{nd}f}" if isinstance(x, float) else str(x)

        def row(label: str, fn: Any) -> None:
            cells = []
            for n in names:
                try:
                    cells.append(fn(st[n]))
                except (KeyError, TypeError):
                    cells.append("n/a")
            lines.append(label.ljust(w0) + "".join(x.ljust(w) for x in cells).rstrip())

        def pp(d: dict) -> str:
            return f"{f(d.get('p50'))} / {f(d.get('p99'))}" if d.get("n") else "n/a"

        row("swaps ok / total", lambda s: f"{s['swaps_ok']} / {s['swaps_total']}")
        row("swap time ms median / max (request->finished)",
            lambda s: f"{f(s['swap_ms']['median'])} / {f(s['swap_ms']['max'])}")  # fmt: skip
        row("  request -> 1st reply from new version, ms",
            lambda s: f"{f(s['request_to_first_new_version_reply_ms']['median'])} / "
            f"{f(s['request_to_first_new_version_reply_ms']['max'])}")  # fmt: skip
        row("requests total (steady / during swap)",
            lambda s: f"{s['requests']['total']} ({s['requests']['steady']} / "
            f"{s['requests']['during_swap']})")  # fmt: skip
        row("steady p50 / p99 ms, pooled", lambda s: pp(s["steady_ms"]))
        for v in self.names.values():
            row(f"  steady p50 / p99 ms, {v}", lambda s, v=v: pp(s["steady_ms_by_version"][v])
                + f" n={s['steady_ms_by_version'][v]['n']}")  # fmt: skip
        row("  pre-swap window p50 / p99 ms", lambda s: pp(s["pre_swap_window_ms"]))
        row("during-swap p50 / p99 ms", lambda s: pp(s["during_swap_ms"]))
        row("  max latency during swap ms", lambda s: f(s["during_swap_ms"].get("max")))
        row("during p99 / slower model's steady p99",
            lambda s: f(s["ratio_during_p99_over_slower_model_steady_p99"], 2)
            + (" (<=2: " + ("met" if s["target_p99_within_2x_met"] else "NOT MET") + ")"
               if "target_p99_within_2x_met" in s else ""))  # fmt: skip
        row("  slower model (the ratio's base)", lambda s: str(s["slower_model"]))
        row(
            "  during p99 / pooled steady p99",
            lambda s: f(s["ratio_during_p99_over_pooled_steady_p99"], 2),
        )
        row(
            "  during p99 / pre-swap window p99",
            lambda s: f(s["ratio_during_p99_over_pre_swap_window_p99"], 2),
        )
        row("daemon queue ms p50/p99 steady", lambda s: pp(s["daemon_queue_ms"]["steady"]))
        row(
            "daemon queue ms p50/p99 during swap", lambda s: pp(s["daemon_queue_ms"]["during_swap"])
        )
        row("errors by status (target 0)",
            lambda s: (", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "0")
            + ("" if s["target_zero_errors_met"] else " NOT MET"))  # fmt: skip
        row("CPU cores used by other processes", lambda s: f(s["foreign_cpu_cores"], 2))
        lines.append("")
        lines.append(
            "Ratio note: the models differ in speed and a swap window mixes requests on both, so "
            "the headline ratio\n  divides the during-swap p99 by the steady p99 of the slower "
            "model (higher steady p50, measured in the\n  same phase while it served, outside "
            "any swap window); the pooled and pre-swap (first model only)\n  ratios also count "
            "the speed difference between the models as if it were a cost of swapping."
        )
        for n in names:
            thin = [v for v, d in st[n]["steady_ms_by_version"].items() if d["n"] < MIN_N]
            if thin:
                lines.append(
                    f"  WARNING {n}: fewer than {MIN_N} steady samples of {', '.join(thin)}; "
                    "the ratio's base may not be the slower model (lengthen --pause)."
                )
        lines.append(
            "Load is closed-loop (each client waits for its reply), so a stall shows as latency "
            "of the requests in\n  flight, not as a backlog; latency is mostly queueing for the "
            f"worker ({self.args.clients} clients, {self.args.workers} worker(s))."
        )
        for n in names:
            lines.append(f"{n} swaps:")
            for i, s in enumerate(st[n]["swaps"], 1):
                stages = ", ".join(
                    f"{k} {v:.0f}" for k, v in s.get("stage_ms", {}).items() if v >= 1
                )
                lines.append(
                    f"  {i}. {self.names.get(s['from'])} -> {self.names.get(s['to'])}: "
                    f"{s['swap_ms']:.0f} ms, 1st new reply +{f(s.get('first_new_reply_ms'))} ms, "
                    f"{s['requests_in_window']} reqs in window [{stages}]"
                    + ("" if s["ok"] else f" FAILED: {s.get('error')}")
                )
        return "\n".join(lines)


def _on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="~1.5-minute smoke run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results/bench-swap.json")
    ap.add_argument("--workers", type=int, default=1, help="daemon workers (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads per worker")
    ap.add_argument("--clients", type=int, default=4, help="load client threads (default 4)")
    ap.add_argument("--swaps", type=int, default=None, help="swaps per strategy (4; quick 2)")
    ap.add_argument("--steady", type=float, default=None, help="steady window s (40; quick 10)")
    ap.add_argument("--pause", type=float, default=None, help="s after each swap (30; quick 12)")
    ap.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    ap.add_argument("--smol", type=Path, default=SMOL)
    ap.add_argument("--gemma", type=Path, default=GEMMA)
    args = ap.parse_args()
    for p in (args.smol, args.gemma):
        if not p.is_file():
            print(
                f"error: {p} does not exist (scripts/fetch_models.py fetches it)", file=sys.stderr
            )
            return 2

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    tmp = Path(tempfile.mkdtemp(prefix="sc-bswap-", dir="/tmp"))  # short socket path
    t0 = now()
    bench = Bench(args, tmp)
    failed: BaseException | None = None
    try:
        bench.run()
    except BaseException as e:  # report, clean up, re-raise below
        failed = e
        bench.res["error"] = repr(e)
    finally:
        if bench.load is not None:
            bench.load.stop_ev.set()
        if bench.daemon is not None:
            bench.res["daemon_exit_code"] = bench.daemon.stop()
        if bench.load is not None:
            bench.load.stop()
        bench.res["loadavg"]["end"] = loadavg()
        bench.res["wall_s"] = round(now() - t0, 1)
        bench.res["completed"] = failed is None
        if bench.load is not None:
            base = min((r[0] for r in bench.load.records), default=0.0)
            bench.res["records_header"] = ["start_s", "ms", "kind", "code", "version", "queue_ms"]
            bench.res["records"] = [
                [round(r[0] - base, 3), round((r[1] - r[0]) * 1000, 1), r[2], r[3], r[4],
                 round(r[5], 1)]
                for r in bench.load.records
            ]  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(bench.res, indent=1) + "\n")
        if bench.res["strategies"]:
            with suppress(Exception):
                print(bench.table(), flush=True)
        log(f"wrote {args.out} (wall {bench.res['wall_s']} s)")
        if failed is None:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            if bench.daemon is not None:
                log(f"daemon log tail:\n{bench.daemon.tail()}")
            log(f"logs kept in {tmp}")
    if isinstance(failed, KeyboardInterrupt):
        return 130
    if failed is not None:
        raise failed
    return 0


if __name__ == "__main__":
    sys.exit(main())
