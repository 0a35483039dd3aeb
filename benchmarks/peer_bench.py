"""`scripts/bench --only peer`: the daemon beside llama.cpp's `llama-server`, in one run.

Same model, same prompts, 16-token greedy generations, closed loop. The daemon runs with
its own defaults (what a user gets); llama-server with `-t` = cores and 1, 4 and 16 slots
(`-np`), each reported, and the best per row. All backends stay loaded and take turns
condition by condition (rotating who goes first): background load on a shared machine
then hits them alike and the ratios stay meaningful. An idle backend costs no CPU.

Measured: requests/s and latency p50/p99 at 1, 4 and 16 clients, and at 4 clients beside
one CPU hog; one client's 128-token decode (latency, time to first token, tokens/s), idle
and beside the hog; and whether greedy replies are identical alone and batched (each of N
prompts alone, then all N at once).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from benchmarks.common import Log
from benchmarks.peer import LlamaCppServer, cores, find_binary, version
from benchmarks.serving_backends import daemon_complete, daemon_stream
from benchmarks.serving_measure import cpu_hog, load_test, summarise_decode
from benchmarks.serving_workload import DECODE_TOKENS, SHORT_TOKENS, STORY, rotate
from sidecar.client import Client

if TYPE_CHECKING:
    from benchmarks.daemon import Daemon
    from benchmarks.serving import Bench

log = Log("bench")
SLOTS = (1, 4, 16)
CLIENTS = ("1", "4", "16", "4+hog")
STREAM_CAP_S = 30.0
SAME_TOKENS = 32  # longer than the load's 16: more room for a batched reply to drift
Make = Callable[[int], Callable[[str], int]]


def run_peer(bench: Bench) -> None:
    a = bench.a
    out: dict[str, Any] = {"cores": cores(), "daemon": {}, "llama_server": {}}
    bench.res["peer"] = out
    binary, why = find_binary(build=a.build_peer)
    if binary is None:
        out["skipped"] = why
        log(f"peer: llama-server column skipped: {why}")
    else:
        out["llama_server_binary"] = str(binary)
        out["llama_server_version"] = version(binary)
    bench.mark("peer: loading")
    d = bench.daemon(None, None)
    out["daemon"]["shape"] = daemon_defaults()
    with ExitStack() as stack:
        servers: dict[str, LlamaCppServer] = {}
        if binary is not None:
            for np in SLOTS:
                try:
                    s = LlamaCppServer(bench.children, binary, a.model, threads=cores(), np=np,
                                       context=a.context, tmp=bench.tmp)  # fmt: skip
                except (RuntimeError, OSError) as e:  # that configuration's column stays empty
                    out["llama_server"][f"np{np}"] = {"error": f"{e}"[-600:]}
                    log(f"peer: llama-server -np {np} did not start: {e}")
                    continue
                stack.callback(s.close)
                servers[f"np{np}"] = s
                out["llama_server"][f"np{np}"] = {"startup_s": round(s.startup_s, 2)}
        c = stack.enter_context(d.client())
        makers: dict[str, Make] = {"daemon": _daemon_maker(d, stack)}
        extras = _extra_daemons(bench, out, stack)
        makers |= {name: _daemon_maker(x, stack) for name, x in extras.items()}
        makers |= {name: _server_maker(s, stack) for name, s in servers.items()}
        for make in makers.values():  # warm-up: every worker and slot has run
            load_test(make, 4, 1.0, bench.prompts)
        _load(bench, makers, out)
        _decode(bench, c, servers.get("np1"), out)
        _same(bench, {"daemon": d, **extras}, servers.get(f"np{SLOTS[-1]}"), out, stack)


def _extra_daemons(bench: Bench, out: dict[str, Any], stack: ExitStack) -> dict[str, Daemon]:
    """The daemon again with other model settings (--peer-parallel, --peer-shape), beside
    the default."""
    from benchmarks.daemon import Daemon

    shapes = [{"parallel": n} for n in bench.a.peer_parallel] + list(bench.a.peer_shape)
    extras: dict[str, Daemon] = {}
    for shape in shapes:
        name = shape_name(shape)
        keys = "".join(f"{k} = {json.dumps(v)}\n" for k, v in shape.items())
        config = f'[models.demo]\npath = "{bench.a.model}"\n{keys}'
        x = Daemon(bench.children, bench.tmp, model="demo", tag=name.removeprefix("daemon_"),
                   config=config, context=bench.a.context)  # fmt: skip
        stack.callback(x.stop)
        x.wait_ready()
        extras[name] = x
        out.setdefault("daemons", {})[name] = {"shape": shape}
    return extras


def shape_name(shape: dict[str, Any]) -> str:
    """daemon_p4 for {"parallel": 4}; daemon_p4-kv_cache=f16 for one more setting."""
    rest = [f"{k}={v}" for k, v in shape.items() if k != "parallel"]
    head = [f"p{shape['parallel']}"] if "parallel" in shape else []
    return "daemon_" + "-".join(head + rest)


def where(out: dict[str, Any], name: str) -> dict[str, Any]:
    """A backend's results: the default daemon's, another daemon shape's, or llama-server's."""
    if name == "daemon":
        return out["daemon"]  # type: ignore[no-any-return]
    if name.startswith("daemon_"):
        return out["daemons"][name]  # type: ignore[no-any-return]
    return out["llama_server"][name]  # type: ignore[no-any-return]


def daemon_defaults() -> dict[str, Any]:
    """The shape `sidecar serve` takes with no flags (threads 0 = chosen by the daemon)."""
    from sidecar.config.schema import ModelConfig

    keep = ("workers", "threads", "context", "batch")
    return {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in keep}


def _load(bench: Bench, makers: dict[str, Make], out: dict[str, Any]) -> None:
    for level, key in enumerate(CLIENTS):
        n = int(key.split("+")[0])
        bench.mark(f"peer: {key} clients")
        with cpu_hog(bench.children, key.endswith("hog")):
            for name in rotate(list(makers), level):
                r = load_test(makers[name], n, bench.load_seconds, bench.prompts)
                where(out, name).setdefault("load", {})[key] = r
                log(f"peer {name} {key} clients: {r.get('req_s')} req/s")


def _daemon_maker(d: Daemon, stack: ExitStack) -> Make:
    def make(_i: int) -> Callable[[str], int]:
        cl = stack.enter_context(d.client())  # one channel (connection) per client thread
        return lambda p: daemon_complete(cl, p, SHORT_TOKENS)

    return make


def _server_maker(s: LlamaCppServer, stack: ExitStack) -> Make:
    def make(_i: int) -> Callable[[str], int]:
        cn = s.conn()
        cn.connect()
        stack.callback(cn.close)
        return lambda p: s.complete(cn, p, SHORT_TOKENS)

    return make


def _decode(bench: Bench, c: Client, s: LlamaCppServer | None, out: dict[str, Any]) -> None:
    """One client, a 128-token greedy generation, the two taking turns; idle, then beside
    the hog (the single-stream decode that must not collapse)."""
    gens: dict[str, Callable[[], dict[str, Any]]] = {
        # a generous cap: only a pathological collapse is cut (and the table says so)
        "daemon": lambda: daemon_stream(c, STORY, DECODE_TOKENS, budget_s=STREAM_CAP_S)
    }
    if s is not None:
        gens["np1"] = lambda: s.stream(STORY, DECODE_TOKENS, budget_s=STREAM_CAP_S)
    for cond in ("idle", "hog"):
        bench.mark(f"peer: decode {cond}")
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in gens}
        with cpu_hog(bench.children, cond == "hog"):
            for i in range(bench.decode_warmup + bench.decode_reps):
                for name in rotate(list(gens), i):
                    r = gens[name]()
                    if i >= bench.decode_warmup:
                        runs[name].append(r)
        for name, rs in runs.items():
            summary = summarise_decode(rs)
            summary.pop("_text", None)
            where(out, name).setdefault("decode", {})[cond] = summary
            log(f"peer {name} decode {cond}: {summary['decode_tok_s']['p50']} tok/s")


def _same(
    bench: Bench,
    daemons: dict[str, Daemon],
    s: LlamaCppServer | None,
    out: dict[str, Any],
    stack: ExitStack,
) -> None:
    """Greedy replies of N prompts, each alone and then all N concurrently: how many agree."""
    bench.mark("peer: alone vs batched")
    prompts = bench.prompts[100 : 100 + (12 if bench.a.quick else 22)]

    def daemon_gen(d: Daemon) -> Callable[[int], Callable[[str], str]]:
        def make(_i: int) -> Callable[[str], str]:
            cl = stack.enter_context(d.client())
            return lambda p: str(cl.generate(p, max_tokens=SAME_TOKENS).text)

        return make

    gens = {name: daemon_gen(d) for name, d in daemons.items()}
    if s is not None:

        def server_gen(_i: int, s: LlamaCppServer = s) -> Callable[[str], str]:
            cn = s.conn()
            stack.callback(cn.close)
            return lambda p: s.generate(cn, p, SAME_TOKENS)[1]

        gens[f"np{s.np}"] = server_gen
    for name, make in gens.items():
        one = make(0)
        alone = [one(p) for p in prompts]
        batched = _all_at_once([make(i) for i in range(len(prompts))], prompts)
        same = sum(x == y for x, y in zip(alone, batched, strict=True))
        where(out, name)["alone_vs_batched"] = {
            "identical": same,
            "of": len(prompts),
            "tokens": SAME_TOKENS,
            "differ": [
                {"prompt": p[:60], "alone": x, "batched": y}
                for p, x, y in zip(prompts, alone, batched, strict=True)
                if x != y
            ][:3],
        }
        log(f"peer {name}: greedy alone == batched for {same} of {len(prompts)}")


def _all_at_once(fns: list[Callable[[str], str]], prompts: list[str]) -> list[str]:
    """Each prompt on its own thread (own connection), released together."""
    texts = [""] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def go(i: int) -> None:
        barrier.wait()
        try:
            texts[i] = fns[i](prompts[i])
        except Exception as e:  # a failed request counts as a different reply
            texts[i] = f"<error {type(e).__name__}: {e}>"

    th = [threading.Thread(target=go, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in th:
        t.start()
    for t in th:
        t.join()
    return texts
