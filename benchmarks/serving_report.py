"""`scripts/bench`'s conclusions (ratios against the targets) and its table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from benchmarks.report import Col, Table
from benchmarks.serving_workload import SHORT_TOKENS


def g(d: Any, *path: str) -> Any:
    """d[path[0]][path[1]]..., or None where a step is missing."""
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def conclude(r: dict[str, Any]) -> None:
    """Add to the results whether the greedy texts agree, and the ratios the targets name."""
    ip, dm, sv = r.get("in_process", {}), r.get("daemon", {}), r.get("llama_cpp_server", {})
    texts = {
        "in_process": g(ip, "decode", "_text"),
        "daemon Generate": g(dm, "decode", "_text"),
        "daemon GenerateStream": g(dm, "decode_stream", "_text"),
        "llama_cpp.server": g(sv, "decode", "_text"),
    }
    for d in (ip, dm, sv):
        for key in ("decode", "decode_stream"):
            if isinstance(d.get(key), dict):
                d[key].pop("_text", None)
    ref = texts.pop("in_process")
    if ref is not None:
        r["decode_same_text_as_in_process"] = {
            k: t == ref for k, t in texts.items() if t is not None
        }

    ratios: dict[str, Any] = {}

    def put(name: str, value: Any, nd: int = 4) -> None:
        if value is not None:
            ratios[name] = round(value, nd) if isinstance(value, float) else value

    dtok, itok = g(dm, "decode", "decode_tok_s", "p50"), g(ip, "decode", "decode_tok_s", "p50")
    if dtok and itok:
        put("decode_tok_s_daemon_over_in_process", dtok / itok)
        put("decode_target_ge_0.97_met", dtok / itok >= 0.97)
    put("decode_tok_s_paired_ratio_p50", g(dm, "decode", "paired_ratio_vs_in_process", "p50"))
    stok = g(dm, "decode_stream", "decode_tok_s", "p50")
    if stok and itok:
        put("decode_stream_tok_s_daemon_over_in_process", stok / itok)
    put(
        "decode_stream_paired_ratio_p50",
        g(dm, "decode_stream", "paired_ratio_vs_in_process", "p50"),
    )
    de, ie = g(dm, "decode", "e2e_tok_s", "p50"), g(ip, "decode", "e2e_tok_s", "p50")
    if de and ie:
        put("e2e_tok_s_daemon_over_in_process", de / ie)
    dt, it = g(dm, "decode_stream", "ttft_ms", "p50"), g(ip, "decode", "ttft_ms", "p50")
    if dt is not None and it is not None:
        put("ttft_p50_daemon_minus_in_process_ms", dt - it, 1)
    dc, ic = g(dm, "classify", "latency_ms", "p50"), g(ip, "classify", "latency_ms", "p50")
    if dc is not None and ic is not None:
        put("classify_p50_daemon_minus_in_process_ms", dc - ic, 2)
        put("classify_target_le_2ms_met", dc - ic <= 2.0)
    put("classify_paired_diff_p50_ms", g(dm, "classify", "paired_diff_vs_in_process_ms", "p50"))
    put("classify_paired_diff_p50_ci95_ms", g(dm, "classify", "paired_diff_p50_ci95_ms"))
    put(
        "classify_client_minus_daemon_reported_p50_ms",
        g(dm, "classify", "client_minus_daemon_reported_ms", "p50"),
    )
    gc = g(sv, "classify_grammar", "latency_ms", "p50")
    if dc and gc:
        put("classify_p50_daemon_over_llama_cpp_server_grammar", dc / gc, 3)
        put("classify_vs_grammar_target_le_0.75_met", dc / gc <= 0.75)
    for n in ("1", "4", "16"):
        a_, b_ = g(dm, "load", n, "req_s"), g(sv, "load", n, "req_s")
        if a_ and b_:
            put(f"req_s_daemon_over_llama_cpp_server_{n}_clients", a_ / b_, 3)
    r["ratios"] = ratios


def f(x: Any, nd: int = 1) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def ratio(a_: Any, b_: Any, nd: int = 3) -> str:
    return f"{a_ / b_:.{nd}f}" if a_ and b_ else "n/a"


def diff(a_: Any, b_: Any) -> str:
    return f"{a_ - b_:+.1f} ms" if a_ is not None and b_ is not None else "n/a"


def table(r: dict[str, Any], stream_budget_s: float) -> str:
    ip, dm, sv = r.get("in_process", {}), r.get("daemon", {}), r.get("llama_cpp_server", {})
    t = Table(Col(44), Col(12), Col(12), Col(18), Col(34))
    c = r["config"]
    t.line()
    t.line(
        f"sidecar bench: {r['machine']['cpu_model']}, {r['machine']['cpus']} CPUs; "
        f"{Path(c['model']).name}, threads={c['threads']} "
        f"workers={c['workers']} ctx={c['context']}{' (QUICK)' if c['quick'] else ''}; "
        f"loadavg start {r['loadavg']['start']} end {r['loadavg'].get('end')}; background CPU "
        f"busy before start {r.get('background_cpu_busy_pct_before_start')}%"
    )
    t.row("metric", "in-process", "daemon", "llama_cpp.server", "daemon vs … (target)")
    t.rule()
    _decode_rows(t, ip, dm, sv)
    _classify_rows(t, ip, dm, sv)
    _load_rows(t, ip, dm, sv)
    if g(sv, "classify_grammar", "latency_ms", "p50"):
        t.line(
            "  * llama_cpp.server has no Classify: a grammar-constrained greedy chat completion "
            "of the same prompt\n    (generates the label instead of scoring all six; reuses "
            "the shared system-prompt KV prefix)."
        )
    _notes(t, r, stream_budget_s)
    return t.render()


def _decode_rows(t: Table, ip: Any, dm: Any, sv: Any) -> None:
    k = ("decode", "decode_tok_s", "p50")
    pr = g(dm, "decode", "paired_ratio_vs_in_process", "p50")
    t.row(
        f"decode tok/s p50 (n={g(dm, 'decode', 'reps')}; tokens/(total-ttft))",
        f(g(ip, *k)),
        f(g(dm, *k)),
        f(g(sv, *k)),
        f"{ratio(g(dm, *k), g(ip, *k))} in-proc (>=0.97); paired {f(pr, 3)}",
    )
    ks = ("decode_stream", "decode_tok_s", "p50")
    prs = g(dm, "decode_stream", "paired_ratio_vs_in_process", "p50")
    t.row(
        "  daemon via GenerateStream",
        "",
        f(g(dm, *ks)),
        "",
        f"{ratio(g(dm, *ks), g(ip, *k))} in-proc; paired {f(prs, 3)}",
    )
    k = ("decode", "e2e_tok_s", "p50")
    t.row(
        "decode tok/s p50, end to end",
        f(g(ip, *k)),
        f(g(dm, *k)),
        f(g(sv, *k)),
        f"{ratio(g(dm, *k), g(ip, *k))} in-proc",
    )
    t.row(
        "completion tokens (each rep)",
        f(g(ip, "decode", "completion_tokens")),
        f(g(dm, "decode", "completion_tokens")),
        f(g(sv, "decode", "completion_tokens")),
        "",
    )
    for q in ("p50", "p99"):
        a_, b_ = g(dm, "decode_stream", "ttft_ms", q), g(ip, "decode", "ttft_ms", q)
        t.row(
            f"time to first token ms {q} (stream)",
            f(b_),
            f(a_),
            f(g(sv, "decode", "ttft_ms", q)),
            f"{diff(a_, b_)} in-proc",
        )
    t.row(
        "  daemon's own request->first token p50",
        "",
        f(g(dm, "decode_stream", "daemon_measured_first_token_ms", "p50")),
        "",
        "",
    )


def _classify_rows(t: Table, ip: Any, dm: Any, sv: Any) -> None:
    cs = g(sv, "classify_grammar", "latency_ms", "p50")
    for q in ("p50", "p99"):
        a_, b_ = g(dm, "classify", "latency_ms", q), g(ip, "classify", "latency_ms", q)
        t.row(
            f"Classify ms {q} (6 labels, n={g(dm, 'classify', 'latency_ms', 'n')})",
            f(b_),
            f(a_),
            f"{f(g(sv, 'classify_grammar', 'latency_ms', q))}*" if cs else "n/a",
            f"{diff(a_, b_)} in-proc" + (" (<=2 ms)" if q == "p50" else ""),
        )
    pd = g(dm, "classify", "paired_diff_vs_in_process_ms", "p50")
    ci = g(dm, "classify", "paired_diff_p50_ci95_ms")
    t.row("  per-text paired diff p50 [95% CI]", "", "", "", f"{f(pd)} ms {ci if ci else ''}")
    t.row(
        "  client latency - daemon's own total p50",
        "",
        f(g(dm, "classify", "client_minus_daemon_reported_ms", "p50"), 2),
        "",
        "ms: socket + gRPC + client",
    )
    gr = ratio(g(dm, "classify", "latency_ms", "p50"), cs, 2) if cs else "n/a"
    t.row("  p50 daemon / llama_cpp.server grammar*", "", "", "", f"{gr}x (<=0.75)")
    t.row(
        "Classify accuracy",
        f(g(ip, "classify", "accuracy"), 3),
        f(g(dm, "classify", "accuracy"), 3),
        f"{f(g(sv, 'classify_grammar', 'accuracy'), 3)}*" if cs else "n/a",
        "",
    )


def _load_rows(t: Table, ip: Any, dm: Any, sv: Any) -> None:
    for n in ("1", "4", "16"):
        a_, b_ = g(dm, "load", n, "req_s"), g(sv, "load", n, "req_s")
        t.row(
            f"req/s, {n} client(s), {SHORT_TOKENS}-token Generate",
            f(g(ip, "load", n, "req_s"), 2) if n == "1" else "-",
            f(a_, 2),
            f(b_, 2),
            f"{ratio(a_, b_, 2)}x llama_cpp.server",
        )

        def lat(d: Any, n: str = n) -> str:
            p50, p99 = g(d, "load", n, "latency_ms", "p50"), g(d, "load", n, "latency_ms", "p99")
            return "-" if p50 is None else f"{f(p50, 0)}/{f(p99, 0)}"

        t.row(f"  latency p50/p99 ms, {n} client(s)", lat(ip), lat(dm), lat(sv), "")
        pl = g(dm, "load", n, "paired_latency_diff_vs_in_process_ms", "p50")
        if pl is not None:
            t.row(
                "  (1 client: backends take turns per request)",
                "",
                "",
                "",
                f"paired {pl:+.1f} ms in-proc",
            )


def _notes(t: Table, r: dict[str, Any], stream_budget_s: float) -> None:
    tq = r.get("threads_question")
    if tq:
        t.line()
        t.line(
            "threads question: daemon decode tok/s p50, one 128-token stream "
            "[| aggregate tok/s of 2 concurrent streams]"
        )
        for key, v in tq.items():
            parts = []
            for cond in ("idle", "busy"):
                e = v.get(cond, {})
                two = g(e, "two_streams", "aggregate_tok_s")
                cut = any(str(x).startswith("cut") for x in g(e, "decode", "finish") or [])
                parts.append(
                    f"{cond}: {f(g(e, 'decode', 'decode_tok_s', 'p50'))}"
                    + (f" (streams cut at {stream_budget_s:.0f}s)" if cut else "")
                    + (f" | {f(two)}" if two is not None else "")
                )
            foreign = [
                g(r, "cpu_by_section", f"threads {key} {cond}", "foreign_cores")
                for cond in ("idle", "busy")
            ]
            t.line(f"  {key:<22} " + "    ".join(parts) + f"   [other load, cores: {foreign}]")
        t.line("  (busy = beside one `python -c 'while True: pass'` process)")
    cn = r.get("cancellation")
    if cn:
        t.line()
        t.line(
            f"cancellation (workers=1, threads={cn['threads']}): Generate(max_tokens=1) sent "
            f"right after cancelling a stream took p50 {f(cn['wait_after_cancel_ms']['p50'])} ms"
            f" (idle: {f(cn['one_token_latency_ms']['p50'])} ms; {f(cn['per_token_ms'], 2)} "
            f"ms/token)\n  => tokens decoded after the cancel: p50 "
            f"{f(cn['tokens_after_cancel']['p50'])}, max {f(cn['tokens_after_cancel']['max'])} "
            f"(each round: {cn['tokens_after_cancel_raw']}; <=0 means within noise)"
        )
    cpu = r.get("cpu_by_section")
    if cpu:
        t.line()
        t.line(
            f"CPU used outside this bench's process tree, in cores (of {os.cpu_count()}), by "
            "section: " + ", ".join(f"{k} {v['foreign_cores']}" for k, v in cpu.items())
        )
    same = r.get("decode_same_text_as_in_process")
    if same:
        t.line()
        t.line(f"greedy 128-token text identical to in-process: {same}")
    if "classify_daemon_agrees_with_in_process" in r:
        agree = r["classify_daemon_agrees_with_in_process"]
        t.line(f"Classify labels, daemon == in-process: {agree:.0%}")


def daemon_only_lines(r: dict[str, Any]) -> str:
    """The daemon-only parts: transport overhead, 77-label zero-shot Classify, Embed throughput."""
    lines = []
    tr = r.get("transport")
    if tr:
        o = tr["overhead_ms"]
        lines.append(
            f"transport overhead (client latency - daemon's own total, {tr['call']}): "
            f"p50 {f(o['p50'], 2)} ms, p99 {f(o['p99'], 2)} ms (target p50 <= "
            f"{f(tr['target_p50_ms'])} ms; daemon total p50 {f(tr['daemon_total_ms']['p50'], 2)} ms)"
        )
    zs = r.get("zero_shot_77")
    if zs:
        lat = zs["latency_ms"]
        lines.append(
            f"Classify zero-shot, {zs['labels']} labels (daemon): p50 {f(lat['p50'], 0)} ms, "
            f"p99 {f(lat['p99'], 0)} ms, n={lat['n']}, accuracy {f(zs['accuracy'], 2)} "
            f"(target p50 <= {f(zs['target_p50_ms'], 0)} ms)"
        )
    em = r.get("embed_short")
    if em:
        for n, d in em["daemon"].items():
            lines.append(
                f"Embed, short texts, {n} client(s) (daemon): {f(d['texts_per_s'], 1)} texts/s, "
                f"{f(d['ratio_vs_one_text_per_decode'], 2)}x {em['reference']}"
                + (f" (target at 8: >= {f(em['target_ratio_8_clients'], 1)}x)" if n == "8" else "")
            )
    return "\n".join(["", *lines]) if lines else ""
