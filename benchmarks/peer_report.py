"""The daemon vs llama-server section of `scripts/bench`: ratios against the issue's
targets (written to the JSON) and the table."""

from __future__ import annotations

from typing import Any

from benchmarks.peer_bench import CLIENTS, SLOTS
from benchmarks.report import Col, Table
from benchmarks.serving_report import f, g
from benchmarks.serving_workload import DECODE_TOKENS

NPS = tuple(f"np{n}" for n in SLOTS)
# daemon / best llama-server requests/s the issue asks for, by clients
REQ_S_TARGET = {"4": 1.2, "16": 1.2, "4+hog": 2.0, "1": 0.95}


def best(ls: dict[str, Any], *path: str) -> tuple[str | None, Any]:
    """The llama-server configuration with the highest value at `path`, and that value."""
    vals = [(np, g(ls, np, *path)) for np in NPS if g(ls, np, *path)]
    return max(vals, key=lambda x: x[1]) if vals else (None, None)


def conclude_peer(p: dict[str, Any]) -> None:
    dm, ls = p.get("daemon", {}), p.get("llama_server", {})
    ratios: dict[str, Any] = {}
    for key in CLIENTS:
        ours = g(dm, "load", key, "req_s")
        for np in NPS:
            theirs = g(ls, np, "load", key, "req_s")
            if ours and theirs:
                ratios[f"req_s_{key}_clients_daemon_over_{np}"] = round(ours / theirs, 3)
        top, theirs = best(ls, "load", key, "req_s")
        if ours and theirs and top:
            r = ours / theirs
            ratios[f"req_s_{key}_clients_daemon_over_best"] = round(r, 3)
            ratios[f"req_s_{key}_clients_best_is"] = top
            ratios[f"req_s_{key}_clients_target_ge_{REQ_S_TARGET[key]}_met"] = (
                r >= REQ_S_TARGET[key]
            )
            lat = (
                g(dm, "load", key, "latency_ms", "p50"),
                g(ls, top, "load", key, "latency_ms", "p50"),
            )
            if lat[0] and lat[1]:
                ratios[f"latency_p50_{key}_clients_daemon_over_best"] = round(lat[0] / lat[1], 3)
    for cond in ("idle", "hog"):
        ours, theirs = (g(x, "decode", cond, "decode_tok_s", "p50") for x in (dm, ls.get("np1")))
        if ours and theirs:
            ratios[f"decode_tok_s_{cond}_daemon_over_np1"] = round(ours / theirs, 3)
        ours, theirs = (g(x, "decode", cond, "total_ms", "p50") for x in (dm, ls.get("np1")))
        if ours and theirs:
            ratios[f"decode_latency_{cond}_daemon_over_np1"] = round(ours / theirs, 3)
    r = ratios.get("decode_tok_s_idle_daemon_over_np1")
    if r is not None:
        ratios["decode_target_ge_0.95_met"] = r >= 0.95
    idle, hog = (g(dm, "decode", c, "decode_tok_s", "p50") for c in ("idle", "hog"))
    if idle and hog:
        ratios["daemon_decode_hog_over_idle"] = round(hog / idle, 3)
        ratios["daemon_decode_hog_target_ge_0.9_met"] = hog / idle >= 0.9
    for name, x in p.get(
        "daemons", {}
    ).items():  # other daemon shapes (--peer-parallel, --peer-shape)
        for key in CLIENTS:
            ours, (top, theirs) = g(x, "load", key, "req_s"), best(ls, "load", key, "req_s")
            if ours and theirs:
                ratios[f"req_s_{key}_clients_{name}_over_best"] = round(ours / theirs, 3)
            main = g(dm, "load", key, "req_s")
            if ours and main:
                ratios[f"req_s_{key}_clients_{name}_over_daemon"] = round(ours / main, 3)
    p["ratios"] = ratios


def peer_table(r: dict[str, Any]) -> str:
    p = r["peer"]
    dm, ls, ratios = p.get("daemon", {}), p.get("llama_server", {}), p.get("ratios", {})
    t = Table(Col(38), Col(13), Col(13), Col(13), Col(13), Col(30))
    t.line()
    t.line(
        f"daemon vs llama.cpp llama-server: {r['machine']['cpu_model']}, {p['cores']} cores; "
        f"llama-server -t {p['cores']} ({p.get('llama_server_version', 'not built')}); "
        f"daemon with its defaults {p.get('daemon', {}).get('shape', '')}"
    )
    if p.get("skipped"):
        t.line(f"  llama-server column SKIPPED: {p['skipped']}")
    t.row(
        "metric", "daemon", *(f"ls -{np[:2]} {np[2:]}" for np in NPS), "daemon / best ls (target)"
    )
    t.rule()
    for key in CLIENTS:
        cells = [f(g(x, "load", key, "req_s"), 2) for x in (dm, *(ls.get(np) for np in NPS))]
        rb = ratios.get(f"req_s_{key}_clients_daemon_over_best")
        tgt = f" (>={REQ_S_TARGET[key]})" if rb is not None else ""
        label = f"req/s, {key.replace('+hog', ' clients + CPU hog')}" + (
            "" if "hog" in key else " client(s)"
        )
        top = ratios.get(f"req_s_{key}_clients_best_is")
        t.row(label, *cells, f"{f(rb, 2)}x vs {top}{tgt}" if top else "n/a")

        def lat(d: Any, key: str = key) -> str:
            a_, b_ = g(d, "load", key, "latency_ms", "p50"), g(d, "load", key, "latency_ms", "p99")
            return "n/a" if a_ is None else f"{f(a_, 0)}/{f(b_, 0)}"

        lr = ratios.get(f"latency_p50_{key}_clients_daemon_over_best")
        t.row("  latency p50/p99 ms", lat(dm), *(lat(ls.get(np)) for np in NPS),
              f"p50 {f(lr, 2)}x" if lr else "")  # fmt: skip
    for cond in ("idle", "hog"):
        k = ("decode", cond, "decode_tok_s", "p50")
        rr = ratios.get(f"decode_tok_s_{cond}_daemon_over_np1")
        tgt = " (>=0.95)" if cond == "idle" else ""
        t.row(f"1 client decode tok/s, {cond}", f(g(dm, *k)), f(g(ls, "np1", *k)), "", "",
              f"{f(rr, 2)}x vs np1{tgt}" if rr else "n/a")  # fmt: skip
        k = ("decode", cond, "total_ms", "p50")
        lr = ratios.get(f"decode_latency_{cond}_daemon_over_np1")
        t.row(f"  latency ms p50 ({DECODE_TOKENS} tokens)", f(g(dm, *k), 0),
              f(g(ls, "np1", *k), 0), "", "", f"{f(lr, 2)}x (lower is better)" if lr else "")  # fmt: skip
        k = ("decode", cond, "ttft_ms", "p50")
        t.row("  time to first token ms p50", f(g(dm, *k)), f(g(ls, "np1", *k)), "", "", "")
    short = [
        f"{name} {toks}"
        for name, d in (("daemon", dm), ("np1", ls.get("np1")))
        for cond in ("idle", "hog")
        if (toks := g(d, "decode", cond, "completion_tokens")) and min(toks) < DECODE_TOKENS
    ]
    if short:
        t.line(f"  (decodes cut short, tokens per rep: {'; '.join(short)})")
    hr = ratios.get("daemon_decode_hog_over_idle")
    t.line(f"daemon decode beside the hog / idle: {f(hr, 2)} (target >= 0.9)")
    daemons = p.get("daemons", {})
    backends = (("daemon", dm), *daemons.items(),
                *((f"llama-server -np {np[2:]}", ls.get(np)) for np in NPS))  # fmt: skip
    for name, d in backends:
        s = g(d, "alone_vs_batched")
        if s:
            t.line(
                f"greedy {s['tokens']}-token replies identical alone and batched, {name}: "
                f"{s['identical']} of {s['of']}"
            )
    for name, x in daemons.items():
        rates = " / ".join(f(g(x, "load", key, "req_s"), 2) for key in CLIENTS)
        over = " / ".join(
            f(ratios.get(f"req_s_{key}_clients_{name}_over_best"), 2) for key in CLIENTS
        )
        vs = " / ".join(
            f(ratios.get(f"req_s_{key}_clients_{name}_over_daemon"), 2) for key in CLIENTS
        )
        t.line(
            f"{name} ({', '.join(f'{k}={v}' for k, v in x['shape'].items())}), req/s at {' / '.join(CLIENTS)} "
            f"clients: {rates}; over best ls: {over}; over the default daemon: {vs}"
        )
        for key in CLIENTS:
            a_, b_ = g(x, "load", key, "latency_ms", "p50"), g(x, "load", key, "latency_ms", "p99")
            if a_ is not None:
                t.line(f"  {key} clients latency p50/p99 ms: {f(a_, 0)}/{f(b_, 0)}")
    return t.render()
