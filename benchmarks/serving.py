"""Benchmark the sidecar daemon against llama-cpp-python and llama.cpp's `llama-server`,
side by side, on the demo model.

    scripts/bench              # the full run (~10-15 minutes on 2 cores)
    scripts/bench --quick      # a ~4-minute smoke run
    scripts/bench --only peer  # one part (or several: --only peer,transport)
    scripts/bench --only peer --peer-parallel 1,4  # also the daemon with parallel 1 and 4
    scripts/bench --only peer --peer-shape parallel=4,kv_cache=f16  # and any other settings
    scripts/bench --out PATH   # JSON somewhere else (default: bench-results/bench.json)

Parts: side (below), peer (the daemon vs llama-server: benchmarks/peer_bench.py), threads
(the threads question), cancel (tokens decoded after a cancel), transport (the daemon's
overhead around a request), zero_shot (Classify over 77 labels), embed (short texts/s at 1 and
8 clients against one text per decode).

Three backends, one process tree, one at a time (so they never compete with each other):

  in-process   `llama_cpp.Llama` in this process (same n_ctx / threads / batch as the daemon);
               for Classify, the daemon's own `LlamaRunner` called directly, so the ratio
               is the cost of the daemon around the same work.
  daemon       `sidecar serve` as a subprocess, over its Unix socket with `sidecar.client.Client`.
  llama_cpp.server   llama-cpp-python's OpenAI-compatible server, over loopback HTTP.

Measured: decode tokens/s and time to first token for a 128-token greedy generation,
Classify p50/p99 (6 Banking77 labels), requests/s at 1/4/16 concurrent clients for a
16-token generation, daemon threads=1,workers=2 vs threads=2,workers=1 (idle and beside
a CPU hog), and how many tokens a worker decodes after a cancelled stream.

llama-server is built once by scripts/build-llama-server (cached outside the repository);
where it cannot be built, its column is skipped with the reason (--no-build-peer: never build).

Every subprocess is stopped on exit, Ctrl-C or error. Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.metadata
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.common import BANKING77, RESULTS, SMOL, Log, loadavg, machine
from benchmarks.cpu import CpuMeter, busy_pct
from benchmarks.daemon import Daemon
from benchmarks.peer_bench import run_peer
from benchmarks.peer_report import conclude_peer, peer_table
from benchmarks.procs import Children, run
from benchmarks.report import write_json
from benchmarks.serving_backends import (
    InProcess,
    LlamaServer,
    daemon_complete,
    daemon_stream,
    daemon_unary,
)
from benchmarks.serving_embed import run_embed
from benchmarks.serving_measure import (
    cpu_hog,
    decode_runs,
    load_test,
    one_client,
    summarise_decode,
    two_streams,
)
from benchmarks.serving_report import conclude, daemon_only_lines, table
from benchmarks.serving_transport import run_transport
from benchmarks.serving_workload import (
    BATCH,
    DECODE_TOKENS,
    LABELS,
    SHORT_TOKENS,
    STORY,
    banking_texts,
    rotate,
    short_prompts,
)
from benchmarks.serving_zero_shot import run_zero_shot
from benchmarks.stats import dist, median_ci
from sidecar.client import Client

if TYPE_CHECKING:  # llama_cpp loads only when the in-process backend starts
    from sidecar.worker.runner import LlamaRunner

now = time.perf_counter
log = Log("bench")
PARTS = ("side", "peer", "threads", "cancel", "transport", "zero_shot", "embed")
# What the parts put in the results: any of them makes the run worth a report and a JSON.
RESULT_KEYS = {"in_process", "daemon", "peer", "transport", "zero_shot_77", "embed_short"}


class Bench:
    def __init__(self, args: argparse.Namespace, children: Children, tmp: Path) -> None:
        self.a = args
        self.children = children
        self.tmp = tmp
        q = args.quick
        self.decode_warmup = 1
        self.decode_reps = 1 if q else 4
        self.classify_per_label = 2 if q else 5
        self.load_seconds = 3.0 if q else 8.0
        self.threads_reps = 1 if q else 2
        self.cancel_rounds = 2 if q else 5
        # a thread-oversubscribed daemon can fall to ~1 token/s: cap each stream's time
        self.stream_budget_s = 8.0 if q else 15.0
        self.rows = banking_texts(args.data, self.classify_per_label)
        self.prompts = short_prompts(args.data, 400)
        self.res: dict[str, Any] = {
            "config": {
                "model": str(args.model),
                "threads": args.threads,
                "workers": args.workers,
                "context": args.context,
                "batch": BATCH,
                "quick": q,
                "decode_tokens": DECODE_TOKENS,
                "decode_prompt": STORY,
                "short_tokens": SHORT_TOKENS,
                "labels": list(LABELS),
                "classify_texts": len(self.rows),
                "load_seconds": self.load_seconds,
                "data": str(args.data),
            },
            "machine": machine()
            | {"llama_cpp_python": importlib.metadata.version("llama_cpp_python")},
            "loadavg": {"start": loadavg()},
            "background_cpu_busy_pct_before_start": busy_pct(),
        }
        self._daemon: tuple[tuple[int | None, int | None], Daemon] | None = None
        self.daemon_startup_s = 0.0
        self.cpu = CpuMeter()

    def daemon(self, workers: int | None, threads: int | None) -> Daemon:
        """The daemon with this shape (None: the daemon's default), started (and any other
        one stopped) if need be."""
        if self._daemon is not None:
            shape, d = self._daemon
            if shape == (workers, threads) and d.running():
                return d
            d.stop(grace=15)
            self._daemon = None
        d = Daemon(self.children, self.tmp, model=self.a.model, tag=f"w{workers}t{threads}",
                   workers=workers, threads=threads, context=self.a.context)  # fmt: skip
        self.daemon_startup_s = d.wait_ready()
        what = "defaults" if workers is None else f"workers={workers} threads={threads}"
        log(f"daemon {what} ready in {self.daemon_startup_s:.1f}s")
        self._daemon = ((workers, threads), d)
        return d

    def shape(self) -> tuple[int | None, int | None] | None:
        return None if self._daemon is None else self._daemon[0]

    def mark(self, section: str) -> None:
        self.cpu.mark(section)
        self.res["loadavg"][section] = loadavg()
        prev = list(self.cpu.sections.items())[-1:]
        note = f"; previous section {prev[0][0]}: {prev[0][1]}" if prev else ""
        log(f"{section} (loadavg {self.res['loadavg'][section]}{note})")

    # -------------------------------------------------------- (a) (b) (c) side by side

    def side_by_side(self) -> None:
        """All three backends loaded at once, measured in alternation.

        The machine may be shared (tests, other builds): interleaving the backends rep by
        rep (rotating who goes first) makes background load hit all of them alike, so the
        ratios stay meaningful even when the absolute numbers wobble. An idle backend
        costs no CPU (workers block on their pipe; the HTTP server waits in its loop).
        """
        from sidecar.domain.specs import RunnerSpec
        from sidecar.worker.runner import LlamaRunner

        a = self.a
        self.mark("side-by-side: loading")
        ip = InProcess(a.model, a.threads, a.context)
        runner = LlamaRunner(
            RunnerSpec(path=a.model, context=a.context, threads=a.threads, batch=BATCH)
        )
        d = self.daemon(a.workers, a.threads)
        s = LlamaServer(self.children, a.model, a.threads, a.context, self.tmp)
        self.res["in_process"] = {}
        self.res["daemon"] = {"startup_s": round(self.daemon_startup_s, 2)}
        self.res["llama_cpp_server"] = {"startup_s": round(s.startup_s, 2)}
        try:
            c = d.client()
            conn = s.conn()
            try:
                self.decode(ip, c, s)
                self.classify(runner, c, s, conn)
            finally:
                c.close()
                conn.close()
                runner.close()
            self.load(ip, d, s)
        finally:
            ip.close()
            s.close()

    def outs(self) -> dict[str, dict[str, Any]]:
        return {k: self.res[k] for k in ("in_process", "daemon", "llama_cpp_server")}

    def decode(self, ip: InProcess, c: Client, s: LlamaServer) -> None:
        """Decode tokens/s and time to first token, the backends taking turns."""
        self.mark("decode")
        outs = self.outs()
        truncated: list[dict[str, Any]] = []

        def server_stream() -> dict[str, Any]:
            for _ in range(3):
                s.flush_cache()  # untimed: no KV-prefix reuse from the previous identical prompt
                r = s.stream(STORY, DECODE_TOKENS)
                if r["finish"] is not None:
                    return r
                # the server cut the stream short (no finish_reason): note it, try again
                truncated.append({k: r[k] for k in ("tokens", "ended", "total")})
                log(f"llama_cpp.server stream cut short: {truncated[-1]}")
            return r

        gens: dict[str, Callable[[], dict[str, Any]]] = {
            "in_process": lambda: ip.stream(STORY, DECODE_TOKENS),
            "daemon": lambda: daemon_unary(c, STORY, DECODE_TOKENS),
            "daemon_stream": lambda: daemon_stream(c, STORY, DECODE_TOKENS),
            "llama_cpp_server": server_stream,
        }
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in gens}
        for i in range(self.decode_warmup + self.decode_reps):
            for name in rotate(list(gens), i):
                r = gens[name]()
                if i >= self.decode_warmup:
                    runs[name].append(r)
        outs["llama_cpp_server"]["truncated_streams"] = truncated
        for name, rs in runs.items():
            key = "decode_stream" if name == "daemon_stream" else "decode"
            out = outs[name.replace("_stream", "")]
            out[key] = summarise_decode(rs)
            log(f"decode {name}: {out[key]['decode_tok_s']['p50']} tok/s")

        def tps(r: dict[str, Any]) -> float:
            return float(r["tokens"] / (r["total"] - r["ttft"]))

        # per-rep ratio of adjacent runs: robust to load that drifts over the run
        for name, key in (("daemon", "decode"), ("daemon_stream", "decode_stream")):
            pairs = zip(runs[name], runs["in_process"], strict=True)
            outs["daemon"][key]["paired_ratio_vs_in_process"] = dist(
                [tps(x) / tps(y) for x, y in pairs], 4
            )

    def classify(
        self, runner: LlamaRunner, c: Client, s: LlamaServer, conn: http.client.HTTPConnection
    ) -> None:
        """Classify latency and accuracy on the same texts, the backends taking turns."""
        from sidecar.domain.types import Classification, ClassifyTask
        from sidecar.worker import prompts

        self.mark("classify")
        outs = self.outs()
        grammar = "root ::= " + " | ".join(f'"{lab}"' for lab in LABELS)

        def in_process(text: str) -> str:
            r = runner.run(ClassifyTask(text, LABELS), None, lambda: False)
            assert isinstance(r, Classification)
            return r.label

        def server_classify(text: str) -> str:
            # No Classify in llama_cpp.server: a grammar-constrained greedy chat completion
            # of the same prompt (it generates the label rather than scoring all of them).
            msgs = prompts.classify_messages(text, LABELS, "")
            r = s.post(conn, "/v1/chat/completions", {
                "messages": [{"role": m.role, "content": m.content} for m in msgs],
                "grammar": grammar, "temperature": 0.0, "repeat_penalty": 1.0, "max_tokens": 32,
            })  # fmt: skip
            return str(r["choices"][0]["message"]["content"]).strip()

        daemon_total_ms: list[float] = []

        def daemon_classify(text: str) -> str:
            reply = c.classify(text, LABELS)
            daemon_total_ms.append(reply.timings.total_ms)
            return str(reply.label)

        classifiers: dict[str, Callable[[str], str]] = {
            "in_process": in_process,
            "daemon": daemon_classify,
            "llama_cpp_server": server_classify,
        }
        lat: dict[str, list[float]] = {k: [] for k in classifiers}
        labels: dict[str, list[str]] = {k: [] for k in classifiers}
        failed: dict[str, str] = {}
        for text, _ in self.rows[:2]:  # warm-up
            for name, fn in classifiers.items():
                try:
                    fn(text)
                except Exception as e:
                    if name != "llama_cpp_server":  # only the server variant is optional
                        raise
                    failed[name] = f"{type(e).__name__}: {e}"[:300]
        for i, (text, _) in enumerate(self.rows):
            for name in rotate(list(classifiers), i):
                if name in failed:
                    continue
                t = now()
                try:
                    label = classifiers[name](text)
                except Exception as e:
                    if name != "llama_cpp_server":
                        raise
                    failed[name] = f"{type(e).__name__}: {e}"[:300]  # optional: drop it
                    continue
                lat[name].append((now() - t) * 1000)
                labels[name].append(label)
        cats = [cat for _, cat in self.rows]
        for name in classifiers:
            key = "classify_grammar" if name == "llama_cpp_server" else "classify"
            if name in failed:
                outs[name][key] = {"error": failed[name]}
                continue
            right = sum(x == y for x, y in zip(labels[name], cats, strict=True))
            outs[name][key] = {
                "latency_ms": dist(lat[name]),
                "accuracy": round(right / len(cats), 3),
            }
            log(f"classify {name}: p50 {outs[name][key]['latency_ms']['p50']} ms")
        if labels["in_process"] and labels["daemon"]:
            same = sum(x == y for x, y in zip(labels["in_process"], labels["daemon"], strict=True))
            self.res["classify_daemon_agrees_with_in_process"] = round(same / len(cats), 3)
        # paired difference per text (same text, adjacent in time): robust to load drift
        if lat["in_process"] and lat["daemon"]:
            dm = outs["daemon"]["classify"]
            diffs = [x - y for x, y in zip(lat["daemon"], lat["in_process"], strict=True)]
            dm["paired_diff_vs_in_process_ms"] = dist(diffs)
            dm["paired_diff_p50_ci95_ms"] = median_ci(diffs)
            # client latency minus the daemon's own request->reply time: the socket, gRPC
            # and client cost, free of the compute noise that swamps the paired difference
            served = daemon_total_ms[-len(lat["daemon"]) :]
            dm["client_minus_daemon_reported_ms"] = dist(
                [x - y for x, y in zip(lat["daemon"], served, strict=True)]
            )
            dm["daemon_reported_total_ms"] = dist(served)

    def load(self, ip: InProcess, d: Daemon, s: LlamaServer) -> None:
        """Requests/s under concurrency (in-process: 1 client only; it is single-threaded)."""
        self.mark("load")
        outs = self.outs()
        for level, n in enumerate((1, 4, 16)):
            makers: dict[str, Callable[[int], Callable[[str], int]]] = {}
            clients: list[Client] = []
            conns: list[http.client.HTTPConnection] = []

            def make_daemon(_i: int, clients: list[Client] = clients) -> Callable[[str], int]:
                cl = d.client()  # one channel (connection) per client thread
                clients.append(cl)
                return lambda p: daemon_complete(cl, p, SHORT_TOKENS)

            def make_server(
                _i: int, conns: list[http.client.HTTPConnection] = conns
            ) -> Callable[[str], int]:
                cn = s.conn()
                cn.connect()
                conns.append(cn)
                return lambda p: s.complete(cn, p, SHORT_TOKENS)

            makers["daemon"] = make_daemon
            makers["llama_cpp_server"] = make_server
            try:
                if n == 1:
                    makers["in_process"] = lambda _i: lambda p: ip.complete(p, SHORT_TOKENS)
                    fns = {name: make(0) for name, make in makers.items()}
                    one = one_client(fns, self.load_seconds * len(fns), self.prompts)
                    for name, res in one.items():
                        outs[name].setdefault("load", {})["1"] = res
                        log(f"{name} 1 client: {res['req_s']} req/s")
                    continue
                for name in rotate(list(makers), level):
                    outs[name].setdefault("load", {})[str(n)] = load_test(
                        makers[name], n, self.load_seconds, self.prompts
                    )
                    log(f"{name} {n} clients: {outs[name]['load'][str(n)].get('req_s')} req/s")
            finally:
                for cl in clients:
                    cl.close()
                for cn in conns:
                    cn.close()

    # -------------------------------------------------------- the threads question

    def threads_question(self) -> None:
        self.mark("threads")
        out: dict[str, Any] = {}
        configs = [(2, 1), (1, 2)]
        if self.shape() == (1, 2):
            configs.reverse()
        budget = self.stream_budget_s
        for workers, threads in configs:
            d = self.daemon(workers, threads)
            key = f"threads={threads},workers={workers}"
            out[key] = {}
            with d.client() as c, d.client() as c2:
                # warm up (capped: an oversubscribed config can crawl even here)
                daemon_stream(c, STORY, DECODE_TOKENS, budget_s=budget)
                for cond in ("idle", "busy"):
                    self.mark(f"threads {key} {cond}")
                    with cpu_hog(self.children, cond == "busy"):
                        la = loadavg()
                        r = decode_runs(
                            lambda: daemon_stream(c, STORY, DECODE_TOKENS, budget_s=budget),
                            0,
                            self.threads_reps,
                        )
                        r.pop("_text", None)
                        entry = {"decode": r, "loadavg": la}
                        if not self.a.quick:
                            entry["two_streams"] = two_streams(
                                lambda cl: daemon_stream(cl, STORY, DECODE_TOKENS, budget_s=budget),
                                (c, c2),
                            )
                        out[key][cond] = entry
                    log(f"{key} {cond}: {r['decode_tok_s']['p50']} tok/s")
        self.res["threads_question"] = out

    # -------------------------------------------------------- cancellation

    def cancellation(self) -> None:
        """How many tokens a worker decodes after its stream is cancelled: a one-token
        Generate sent right after the cancel waits for them."""
        self.mark("cancel")
        d = self.daemon(1, self.a.threads)
        out: dict[str, Any] = {"workers": 1, "threads": self.a.threads}
        one_prompt = "The capital of France is"
        with d.client() as c:
            for _ in range(2):
                c.generate(one_prompt, max_tokens=1)
            base = []
            for _ in range(5):
                t = now()
                c.generate(one_prompt, max_tokens=1)
                base.append(now() - t)
            base_s = statistics.median(base)
            ref = daemon_stream(c, STORY, 64)
            per_token_s = (ref["total"] - ref["ttft"]) / max(1, ref["tokens"] - 1)
            waits, after = [], []
            for _ in range(self.cancel_rounds):
                call: Any = c.generate_stream(STORY, max_tokens=512)
                got = 0
                for ch in call:
                    if not ch.HasField("summary"):
                        got += 1
                    if got >= 5:
                        break
                call.cancel()
                t0 = now()
                c.generate(one_prompt, max_tokens=1)
                wait = now() - t0
                waits.append(wait * 1000)
                after.append((wait - base_s) / per_token_s)
                time.sleep(0.2)
        out.update(
            {
                "one_token_latency_ms": dist([b * 1000 for b in base]),
                "per_token_ms": round(per_token_s * 1000, 2),
                "wait_after_cancel_ms": dist(waits),
                "tokens_after_cancel": dist(after),
                "tokens_after_cancel_raw": [round(x, 2) for x in after],
            }
        )
        self.res["cancellation"] = out

    # -------------------------------------------------------- report

    def finish(self) -> None:
        self.res["loadavg"]["end"] = loadavg()
        self.cpu.mark(None)
        self.res["cpu_by_section"] = self.cpu.sections
        conclude(self.res)
        if "peer" in self.res:
            conclude_peer(self.res["peer"])
        if "in_process" in self.res:
            print(table(self.res, self.stream_budget_s), flush=True)
        if "peer" in self.res:
            print(peer_table(self.res), flush=True)
        print(daemon_only_lines(self.res), flush=True)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="scripts/bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="~2-minute smoke run (fewer repetitions)")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench.json", help="JSON results path")
    ap.add_argument("--model", type=Path, default=SMOL)
    ap.add_argument(
        "--data",
        type=Path,
        default=BANKING77 / "test.csv",
        help="Banking77 test.csv (text,category)",
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="llama.cpp threads (all backends; daemon per worker)"
    )
    ap.add_argument("--workers", type=int, default=2, help="daemon workers for the main comparison")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument(
        "--only",
        type=parts,
        default=PARTS,
        metavar="PART[,PART]",
        help=f"run only these parts, in this order (default: all): {','.join(PARTS)}",
    )
    ap.add_argument(
        "--peer-parallel",
        type=counts,
        default=(),
        metavar="N[,N]",
        help="peer part: also the daemon with models.NAME.parallel = N, beside its defaults",
    )
    ap.add_argument(
        "--peer-shape",
        type=shape,
        action="append",
        default=[],
        metavar="KEY=V[,KEY=V]",
        help="peer part: also the daemon with these models.NAME settings (repeatable), e.g. "
        "parallel=4,kv_cache=f16",
    )
    ap.add_argument(
        "--no-build-peer",
        dest="build_peer",
        action="store_false",
        help="skip the llama-server column rather than build it (scripts/build-llama-server)",
    )
    return ap


def counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,4 (got {text!r})")
    return values


def shape(text: str) -> dict[str, Any]:
    """Model settings for one more daemon: integers stay integers, the rest are strings."""
    out: dict[str, Any] = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE[,KEY=VALUE] (got {text!r})")
        v = value.strip()
        out[key.strip()] = int(v) if v.isdigit() else v
    if not out:
        raise argparse.ArgumentTypeError("expected KEY=VALUE[,KEY=VALUE] (got nothing)")
    return out


def parts(text: str) -> tuple[str, ...]:
    chosen = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [x for x in chosen if x not in PARTS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"parts are {', '.join(PARTS)} (got {text!r})")
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for p in (args.model, args.data):
        if not p.exists():
            print(f"error: {p} does not exist", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="sc-bench-", dir="/tmp"))  # short socket paths
    t0 = now()
    failed = True
    with Children() as children:
        bench = Bench(args, children, tmp)
        steps: dict[str, Callable[[], None]] = {
            "side": bench.side_by_side,
            "peer": lambda: run_peer(bench),
            "threads": bench.threads_question,
            "cancel": bench.cancellation,
            "transport": lambda: run_transport(bench),
            "zero_shot": lambda: run_zero_shot(bench),
            "embed": lambda: run_embed(bench),
        }
        try:
            for part in args.only:
                steps[part]()
            failed = False
        finally:
            children.close()  # the daemon, the HTTP server, any CPU hog
            bench.res["wall_s"] = round(now() - t0, 1)
            bench.res["completed"] = not failed
            if set(bench.res) & RESULT_KEYS:
                with suppress(Exception):
                    bench.finish()
                write_json(args.out, bench.res)
                log(f"wrote {args.out} (wall {bench.res['wall_s']} s)")
            if failed:
                log(f"subprocess logs kept in {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
