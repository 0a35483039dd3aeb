"""bench-swap's analysis of the recorded requests, and its table."""

from __future__ import annotations

import argparse
import itertools
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any

from benchmarks.report import Col, Table
from benchmarks.stats import dist

AFTER_S = 1.0  # a swap's window extends this long past its end
MIN_N = 5  # fewer steady samples of a model than this: not used as the ratio's base

# start, end, kind, status code, model version, daemon queue ms, error detail
Rec = tuple[float, float, str, str, str, float, str]


@dataclass(frozen=True)
class Phase:
    """One strategy's run: a steady window [start, steady_end), then swaps until end."""

    start: float
    steady_end: float
    end: float
    swaps: list[dict[str, Any]]


def stage_times(stages: list[dict[str, Any]]) -> dict[str, float]:
    """ms spent in each stage (until the next one started), from the server's clock."""
    out: dict[str, float] = {}
    for a, b in itertools.pairwise(stages):
        out[a["stage"]] = round(out.get(a["stage"], 0) + b["server_ms"] - a["server_ms"], 1)
    return out


def _ms(r: Rec) -> float:
    return (r[1] - r[0]) * 1000


def _ok(rs: list[Rec]) -> list[Rec]:
    return [r for r in rs if r[3] == "OK"]


def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 2) if a and b else None


def analyse(
    strategy: str, phase: Phase, records: list[Rec], names: dict[str, str]
) -> dict[str, Any]:
    """Latency during swaps versus steady state, per model and kind; errors; swap times."""
    start, swaps = phase.start, phase.swaps
    recs = [r for r in list(records) if start <= r[0] < phase.end]
    windows = [(s["t0"], s["t1"] + AFTER_S) for s in swaps]

    def during(r: Rec) -> bool:
        return any(r[0] < w1 and r[1] > w0 for w0, w1 in windows)

    swap_recs = [r for r in recs if during(r)]
    steady_recs = [r for r in recs if not during(r)]
    steady_by_ver = {v: dist([_ms(r) for r in _ok(steady_recs) if r[4] == v], 1) for v in names}
    # The slower model by steady p50, among models with enough steady samples to say.
    slower = max(
        (v for v in names if steady_by_ver[v]["n"] >= MIN_N),
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
    during_d = dist([_ms(r) for r in _ok(swap_recs)], 1)
    steady_d = dist([_ms(r) for r in _ok(steady_recs)], 1)
    pre_d = dist([_ms(r) for r in recs if r[1] <= phase.steady_end and r[3] == "OK"], 1)
    slow_p99 = steady_by_ver[slower]["p99"] if slower else None
    ok_swaps = [s for s in swaps if s["ok"]]
    swap_ms = [s["swap_ms"] for s in ok_swaps]
    first = [s["first_new_reply_ms"] for s in ok_swaps if s["first_new_reply_ms"] is not None]
    by_kind = {
        kind: {
            "steady": dist([_ms(r) for r in _ok(steady_recs) if r[2] == kind], 1),
            "during_swap": dist([_ms(r) for r in _ok(swap_recs) if r[2] == kind], 1),
        }
        for kind in ("classify", "generate")
    }
    headline = _ratio(during_d.get("p99"), slow_p99)
    out: dict[str, Any] = {
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
        "requests": {"total": len(recs), "steady": len(steady_recs), "during_swap": len(swap_recs)},
        "steady_ms": steady_d,
        "steady_ms_by_version": {names[v]: d for v, d in steady_by_ver.items()},
        "pre_swap_window_ms": pre_d,
        "during_swap_ms": during_d,
        "by_kind_ms": by_kind,
        "daemon_queue_ms": {
            "steady": dist([r[5] for r in _ok(steady_recs)], 1),
            "during_swap": dist([r[5] for r in _ok(swap_recs)], 1),
        },
        "slower_model": names.get(slower or ""),
        "ratio_during_p99_over_slower_model_steady_p99": headline,
        "ratio_during_p99_over_pooled_steady_p99": _ratio(during_d.get("p99"), steady_d.get("p99")),
        "ratio_during_p99_over_pre_swap_window_p99": _ratio(during_d.get("p99"), pre_d.get("p99")),
        "errors": dict(errors),
        "error_samples": error_samples,
        "swaps": [
            {k: v for k, v in s.items() if k not in ("t0", "t1")}
            | {"t0_s": round(s["t0"] - start, 2), "t1_s": round(s["t1"] - start, 2)}
            for s in swaps
        ],
    }
    out["target_zero_errors_met"] = not errors and len(ok_swaps) == len(swaps)
    if strategy == "side_by_side":
        out["target_p99_within_2x_met"] = headline is not None and headline <= 2.0
    return out


def _f(x: Any, nd: int = 0) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _pp(d: dict[str, Any]) -> str:
    return f"{_f(d.get('p50'))} / {_f(d.get('p99'))}" if d.get("n") else "n/a"


def table(r: dict[str, Any], names: dict[str, str], args: argparse.Namespace) -> str:
    c = r["config"]
    st = r["strategies"]
    strategies = list(st)
    t = Table(Col(50), *(Col(22) for _ in strategies))
    t.line()
    t.line(
        f"sidecar bench-swap{' (QUICK)' if c['quick'] else ''}: workers={c['workers']} "
        f"threads={c['threads']}, {c['clients']} clients ({c['mix']}); "
        f"loadavg start {r['loadavg']['start']} end {r['loadavg'].get('end')}"
    )
    t.line(
        f"per strategy: {c['steady_window_s']:.0f} s steady window, then "
        f"{c['swaps_per_strategy']} swaps SmolLM2<->Gemma with {c['pause_after_swap_s']:.0f} s "
        f"after each; 'during swap' = overlapping [request, finished + {AFTER_S:.0f} s]"
    )
    t.row("metric", *strategies)
    t.rule()

    def row(label: str, fn: Any) -> None:
        cells = []
        for n in strategies:
            try:
                cells.append(fn(st[n]))
            except (KeyError, TypeError):
                cells.append("n/a")
        t.row(label, *cells)

    row("swaps ok / total", lambda s: f"{s['swaps_ok']} / {s['swaps_total']}")
    row("swap time ms median / max (request->finished)",
        lambda s: f"{_f(s['swap_ms']['median'])} / {_f(s['swap_ms']['max'])}")  # fmt: skip
    row("  request -> 1st reply from new version, ms",
        lambda s: f"{_f(s['request_to_first_new_version_reply_ms']['median'])} / "
        f"{_f(s['request_to_first_new_version_reply_ms']['max'])}")  # fmt: skip
    row("requests total (steady / during swap)",
        lambda s: f"{s['requests']['total']} ({s['requests']['steady']} / "
        f"{s['requests']['during_swap']})")  # fmt: skip
    row("steady p50 / p99 ms, pooled", lambda s: _pp(s["steady_ms"]))
    for v in names.values():
        row(f"  steady p50 / p99 ms, {v}", lambda s, v=v: _pp(s["steady_ms_by_version"][v])
            + f" n={s['steady_ms_by_version'][v]['n']}")  # fmt: skip
    row("  pre-swap window p50 / p99 ms", lambda s: _pp(s["pre_swap_window_ms"]))
    row("during-swap p50 / p99 ms", lambda s: _pp(s["during_swap_ms"]))
    row("  max latency during swap ms", lambda s: _f(s["during_swap_ms"].get("max")))
    row("during p99 / slower model's steady p99",
        lambda s: _f(s["ratio_during_p99_over_slower_model_steady_p99"], 2)
        + (" (<=2: " + ("met" if s["target_p99_within_2x_met"] else "NOT MET") + ")"
           if "target_p99_within_2x_met" in s else ""))  # fmt: skip
    row("  slower model (the ratio's base)", lambda s: str(s["slower_model"]))
    row("  during p99 / pooled steady p99",
        lambda s: _f(s["ratio_during_p99_over_pooled_steady_p99"], 2))  # fmt: skip
    row("  during p99 / pre-swap window p99",
        lambda s: _f(s["ratio_during_p99_over_pre_swap_window_p99"], 2))  # fmt: skip
    row("daemon queue ms p50/p99 steady", lambda s: _pp(s["daemon_queue_ms"]["steady"]))
    row("daemon queue ms p50/p99 during swap", lambda s: _pp(s["daemon_queue_ms"]["during_swap"]))
    row("errors by status (target 0)",
        lambda s: (", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "0")
        + ("" if s["target_zero_errors_met"] else " NOT MET"))  # fmt: skip
    row("CPU cores used by other processes", lambda s: _f(s["foreign_cpu_cores"], 2))
    t.line()
    t.line(
        "Ratio note: the models differ in speed and a swap window mixes requests on both, so "
        "the headline ratio\n  divides the during-swap p99 by the steady p99 of the slower "
        "model (higher steady p50, measured in the\n  same phase while it served, outside "
        "any swap window); the pooled and pre-swap (first model only)\n  ratios also count "
        "the speed difference between the models as if it were a cost of swapping."
    )
    for n in strategies:
        thin = [v for v, d in st[n]["steady_ms_by_version"].items() if d["n"] < MIN_N]
        if thin:
            t.line(
                f"  WARNING {n}: fewer than {MIN_N} steady samples of {', '.join(thin)}; "
                "the ratio's base may not be the slower model (lengthen --pause)."
            )
    t.line(
        "Load is closed-loop (each client waits for its reply), so a stall shows as latency "
        "of the requests in\n  flight, not as a backlog; latency is mostly queueing for the "
        f"worker ({args.clients} clients, {args.workers} worker(s))."
    )
    for n in strategies:
        t.line(f"{n} swaps:")
        for i, s in enumerate(st[n]["swaps"], 1):
            stages = ", ".join(f"{k} {v:.0f}" for k, v in s.get("stage_ms", {}).items() if v >= 1)
            t.line(
                f"  {i}. {names.get(s['from'])} -> {names.get(s['to'])}: "
                f"{s['swap_ms']:.0f} ms, 1st new reply +{_f(s.get('first_new_reply_ms'))} ms, "
                f"{s['requests_in_window']} reqs in window [{stages}]"
                + ("" if s["ok"] else f" FAILED: {s.get('error')}")
            )
    return t.render()
