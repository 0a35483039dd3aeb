"""Zero-shot out of scope on Banking77: does the label-score novelty tell strange texts apart?

    scripts/bench-zero-shot-scope            # 2 draws x 25 intents x 5 test rows (~10 min quiet)
    scripts/bench-zero-shot-scope --quick    # 1 draw x 25 intents x 3 rows
    scripts/bench-zero-shot-scope --out PATH # JSON elsewhere

Each draw picks 25 of the 77 intents at random (seeded): 20 are the labels of a plain
Classify (no examples, no task: every label scored by the model), 5 are left out, and
their test rows are out of scope ("left-out intents": banking questions the labels do not
cover). Each draw also classifies 20 off-topic questions written for this benchmark
(`OFF_TOPIC`: weather, recipes, trivia), out of scope the obvious way. The daemon runs as a
subprocess on SmolLM2-135M (2 workers x 1 thread), LOCAL_ONLY, with the configured defaults.

Reported: the AUROC, against each kind of out-of-scope row, of the served `novelty` and of
each candidate signal it could be built from (normalised entropy, 1 - top probability, the
label mass, per label token or not, and the text's own mean token log-probability, measured
in-process with logits for every row, with its cost); and, as AUTO would route them, the
share of out-of-scope rows kept local, of in-scope rows kept local and their accuracy: at
cloud.classify_threshold alone, and with cloud.classify_none_novelty at a few cuts.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BANKING77, RESULTS, SMOL, Log, loadavg, machine
from benchmarks.daemon import Daemon
from benchmarks.fanout import each_row
from benchmarks.procs import Children, run
from benchmarks.report import Col, Table, write_json
from benchmarks.routing import load_rows
from benchmarks.stats import dist
from sidecar.client import Client
from sidecar.config import Overrides, load
from sidecar.evaluation.confidence import auroc
from sidecar.worker import label_scope

CUTS = (0.5, 0.6, 0.7, 0.8, 0.9)
OFF_TOPIC = (
    "What will the weather be like in Paris tomorrow?",
    "Can you recommend a good recipe for lasagna?",
    "Who won the football world cup in 2018?",
    "How do I fix a flat bicycle tyre?",
    "Write a short poem about the sea.",
    "What time does the cinema open on Sundays?",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is the capital of Australia?",
    "My cat keeps scratching the sofa, what should I do?",
    "Book me a table for two at 8pm.",
    "How tall is Mount Everest?",
    "Play some relaxing music.",
    "What is the best way to learn the guitar?",
    "Is it going to snow this weekend?",
    "Tell me a joke about programmers.",
    "How long should I boil an egg?",
    "Which planet is closest to the sun?",
    "Set an alarm for 7 in the morning.",
    "What are the symptoms of the flu?",
)
KINDS = ("left_out", "off_topic")
log = Log("bench-zero-shot-scope")


def draw(
    rows: list[tuple[str, str]], intents: list[str], rng: random.Random, n_in: int, n_out: int,
    per_intent: int,
) -> tuple[list[str], list[tuple[str, str, str]]]:  # fmt: skip
    """The labels and the (text, gold, kind) rows of one draw (kind: "in", or a KINDS)."""
    picked = rng.sample(intents, n_in + n_out)
    labels, left_out = picked[:n_in], set(picked[n_in:])
    by: dict[str, list[str]] = {}
    for text, cat in rows:
        by.setdefault(cat, []).append(text)
    out = [
        (text, cat, "in" if cat not in left_out else "left_out")
        for cat in picked
        for text in rng.sample(by[cat], min(per_intent, len(by[cat])))
    ]
    out += [(text, "", "off_topic") for text in OFF_TOPIC]
    rng.shuffle(out)
    return labels, out


def classify_rows(
    sock: Path, labels: list[str], rows: list[tuple[str, str, str]], clients: int
) -> list[dict[str, Any]]:
    def one(c: Client, row: tuple[str, str, str]) -> dict[str, Any]:
        text, gold, kind = row
        t0 = time.perf_counter()
        r = c.classify(text, labels, routing="LOCAL_ONLY", timeout=300)
        ms = (time.perf_counter() - t0) * 1000
        logps = {s.label: s.logprob for s in r.scores}
        return {"text": text, "gold": gold, "kind": kind, "in_scope": kind == "in",
                "label": r.scores[0].label, "p": r.confidence.top_probability,
                "novelty": r.novelty if r.HasField("novelty") else None,
                "out_of_scope": r.out_of_scope,
                "logprobs": [logps[x] for x in labels], "ms": ms}  # fmt: skip

    return each_row(sock, rows, clients, "bench-zero-shot-scope", one)[0]


def text_likelihood(model: Path, texts: list[str]) -> tuple[list[float], dict[str, float]]:
    """Each text's mean token log-probability (logits for every row), and what that costs
    beside a decode that keeps only the last row's logits (ms per text, 1 thread)."""
    from llama_cpp import Llama  # only here: the rest of the benchmark talks to a daemon

    means: list[float] = []
    cost = {"texts": float(len(texts)), "all_rows_ms": 0.0, "last_row_ms": 0.0}
    for logits_all in (True, False):
        llm = Llama(str(model), n_ctx=512, n_threads=1, logits_all=logits_all, verbose=False)
        started = time.perf_counter()
        for text in texts:
            tokens = llm.tokenize(text.encode(), add_bos=True)[:500]
            llm.reset()  # type: ignore[no-untyped-call]
            llm.eval(tokens)
            if logits_all:
                logits = np.asarray(llm.scores[: len(tokens) - 1], np.float64)
                hi = logits.max(axis=1, keepdims=True)
                lse = hi[:, 0] + np.log(np.exp(logits - hi).sum(axis=1))
                picked = logits[np.arange(len(tokens) - 1), tokens[1:]]
                means.append(float((picked - lse).mean()) if len(tokens) > 1 else 0.0)
        key = "all_rows_ms" if logits_all else "last_row_ms"
        cost[key] = round((time.perf_counter() - started) * 1000 / max(1, len(texts)), 2)
        llm.close()
    return means, cost


def candidates(res: list[dict[str, Any]]) -> dict[str, Callable[[dict[str, Any]], float]]:
    """Signals a zero-shot novelty could be built from (higher = more out of scope)."""

    def feat(r: dict[str, Any]) -> label_scope.ScopeFeatures:
        return label_scope.features(r["logprobs"], r["lengths"])

    out: dict[str, Callable[[dict[str, Any]], float]] = {
        "novelty (served: per-token label mass)": lambda r: float(r["novelty"]),
        "normalised entropy": lambda r: feat(r).entropy,
        "1 - top probability": lambda r: 1 - feat(r).top,
        "label mass, -log": lambda r: -feat(r).log_mass,
        "mean of entropy and novelty": lambda r: 0.5 * feat(r).entropy + 0.5 * r["novelty"],
    }
    if any("text_mean_logprob" in r for r in res):  # measured on a sample of the rows
        out["text surprisal (-mean token logprob)*"] = lambda r: (
            -float(r.get("text_mean_logprob", math.nan))
        )
    return out


def routed(res: list[dict[str, Any]], threshold: float, cut: float) -> dict[str, Any]:
    """AUTO's verdicts: kept local = top probability >= threshold and novelty < cut."""

    def kept(r: dict[str, Any]) -> bool:
        return bool(r["p"] >= threshold and not (cut and r["novelty"] >= cut))

    def share(rows: list[dict[str, Any]]) -> float:
        return round(sum(map(kept, rows)) / len(rows), 3) if rows else float("nan")

    ins = [r for r in res if r["in_scope"]]
    kept_in = [r for r in ins if kept(r)]
    acc = sum(r["label"] == r["gold"] for r in kept_in) / len(kept_in) if kept_in else float("nan")
    return {
        "threshold": threshold,
        "cut": cut,
        **{f"{k}_kept_local": share([r for r in res if r["kind"] == k]) for k in KINDS},
        "in_scope_kept_local": share(ins),
        "in_scope_kept_accuracy": round(acc, 3),
    }


def summarise(res: list[dict[str, Any]], threshold: float, cut: float) -> dict[str, Any]:
    ins = [r for r in res if r["in_scope"]]

    def values(f: Callable[[dict[str, Any]], float], rows: list[dict[str, Any]]) -> list[float]:
        return [v for v in map(f, rows) if not math.isnan(v)]

    aurocs = {
        k: {
            name: round(auroc(values(f, ins), values(f, [r for r in res if r["kind"] == k])), 3)
            for name, f in candidates(res).items()
        }
        for k in KINDS
    }
    served_cut = [r for r in res if cut and (r["novelty"] >= cut) != r["out_of_scope"]]
    return {
        "rows": len(res),
        "in_scope_rows": len(ins),
        **{f"{k}_rows": sum(r["kind"] == k for r in res) for k in KINDS},
        "in_scope_accuracy": round(sum(r["label"] == r["gold"] for r in ins) / len(ins), 3),
        "auroc": aurocs,
        "threshold_only": routed(res, threshold, 0.0),
        "configured_cut": routed(res, threshold, cut),
        "cuts": [routed(res, threshold, c) for c in CUTS],
        "cuts_without_threshold": [routed(res, 0.0, c) for c in CUTS],
        "served_flag_mismatches": len(served_cut),
        "latency_ms": dist([r["ms"] for r in res], 0),
    }


def pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}%"


def table(r: dict[str, Any]) -> str:
    s = r["summary"]
    t = Table(Col(40), Col(10, ">"), Col(10, ">", 2))
    t.line(f"Zero-shot out of scope, Banking77: {r['draws']} draw(s) x {r['labels']} labels; "
           f"{s['in_scope_rows']} in-scope rows, {s['left_out_rows']} rows of {r['left_out']} "
           f"left-out intents per draw, {s['off_topic_rows']} off-topic")  # fmt: skip
    t.line()
    t.row("AUROC against:", "left-out", "off-topic")
    t.rule()
    for name in s["auroc"]["left_out"]:
        t.row(name, f"{s['auroc']['left_out'][name]:.3f}", f"{s['auroc']['off_topic'][name]:.3f}")
    if "text_cost" in r:
        c = r["text_cost"]
        t.line(f"* on {c['texts']:.0f} of the rows; the text's log-probability costs {c['all_rows_ms']} "
               f"ms per text with logits for every row, {c['last_row_ms']} ms for the last row "
               f"only (in-process, 1 thread)")  # fmt: skip
    t.line()
    u = Table(Col(34), Col(10, ">"), Col(10, ">", 2), Col(10, ">", 2), Col(10, ">", 2))
    u.row("AUTO keeps local:", "left-out", "off-topic", "in-scope", "accuracy")
    u.rule()
    rows = [("classify_threshold alone", s["threshold_only"])]
    rows += [(f"+ classify_none_novelty {c['cut']:g}", c) for c in s["cuts"]]
    rows += [(f"cut {c['cut']:g}, no threshold", c) for c in s["cuts_without_threshold"]]
    for name, c in rows:
        u.row(name, pct(c["left_out_kept_local"]), pct(c["off_topic_kept_local"]),
              pct(c["in_scope_kept_local"]), pct(c["in_scope_kept_accuracy"]))  # fmt: skip
    lat = s["latency_ms"]
    u.line()
    u.line(f"in-scope accuracy (all rows): {pct(s['in_scope_accuracy'])}; Classify p50 "
           f"{lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms ({r['clients']} clients); threshold "
           f"{s['threshold_only']['threshold']:g}; configured cut "
           f"{s['configured_cut']['cut']:g} (0 = off)")  # fmt: skip
    return t.render() + "\n" + u.render()


def label_lengths(model: Path, labels: list[str]) -> list[int]:
    """Each label's tokens plus the end-of-turn token, as the worker scores them."""
    from llama_cpp import Llama

    vocab = Llama(str(model), vocab_only=True, verbose=False)
    try:
        return [len(vocab.tokenize(x.encode(), add_bos=False)) + 1 for x in labels]
    finally:
        vocab.close()


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="scripts/bench-zero-shot-scope",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="1 draw, 3 rows per intent")
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--labels", type=int, default=20, help="in-scope intents (the labels)")
    ap.add_argument("--left-out", type=int, default=5, help="out-of-scope intents")
    ap.add_argument("--per-intent", type=int, default=5, help="test rows per intent")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--seed", type=int, default=77)
    ap.add_argument("--no-text", action="store_true", help="skip the text log-probability")
    ap.add_argument("--text-rows", type=int, default=60, help="rows it is measured on")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench-zero-shot-scope.json")
    ap.add_argument("--data", type=Path, default=BANKING77, help="Banking77 test.csv")
    ap.add_argument("--model", type=Path, default=SMOL)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.draws, args.per_intent = 1, 3
    rows = load_rows(args.data, "test.csv")
    intents = sorted({c for _, c in rows})
    rng = random.Random(args.seed)
    draws = [
        draw(rows, intents, rng, args.labels, args.left_out, args.per_intent)
        for _ in range(args.draws)
    ]
    tmp = Path(tempfile.mkdtemp(prefix="sc-bzss-", dir="/tmp"))
    model = args.model.resolve()
    config = f'[models.demo]\npath = "{model}"\nworkers = 2\nthreads = 1\n'
    (tmp / "effective.toml").write_text(config)
    cloud = load(Overrides(config=tmp / "effective.toml"), env={}).cloud
    res: list[dict[str, Any]] = []
    load_before = loadavg()
    with Children() as children:
        d = Daemon(children, tmp, config=config)
        try:
            log(f"ready after {d.wait_ready():.1f}s")
            for k, (labels, drawn) in enumerate(draws):
                log(f"draw {k + 1}/{len(draws)}: {len(drawn)} rows over {len(labels)} labels")
                got = classify_rows(d.socket, labels, drawn, args.clients)
                lengths = label_lengths(model, labels)
                res += [{**r, "draw": k, "lengths": lengths} for r in got]
        finally:
            d.stop()
    report: dict[str, Any] = {"machine": machine(), "loadavg_before": load_before,
                              "draws": args.draws, "labels": args.labels,
                              "left_out": args.left_out, "per_intent": args.per_intent,
                              "clients": args.clients, "seed": args.seed}  # fmt: skip
    # The classifications are the slow part: kept before anything else can fail.
    write_json(args.out, {**report, "partial": True, "rows": res})
    if not args.no_text and args.text_rows:
        sample = res[:: max(1, len(res) // args.text_rows)][: args.text_rows]
        log(f"text log-probabilities of {len(sample)} rows, in-process")
        means, report["text_cost"] = text_likelihood(model, [r["text"] for r in sample])
        for r, m in zip(sample, means, strict=True):
            r["text_mean_logprob"] = m
    report["summary"] = summarise(res, cloud.classify_threshold, cloud.classify_none_novelty)
    report["rows"] = res
    report["loadavg_after"] = loadavg()
    print(table(report))
    write_json(args.out, report)
    log(f"wrote {args.out}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
