"""The report's numbers from a run's replies, and the table the terminal shows.

Quality is scored over every row the daemon answered or refused (a refused request is a
wrong answer); a row it did not get to (a timeout, no worker, a full queue) is listed apart
and scored nowhere: a wait says nothing of the model. Confidence is judged
over the rows the local model answered, in the unit AUTO compares: Classify's calibrated
top probability, Extract's mean token log-probability (its exp, the geometric mean of the
tokens' probabilities, is what calibration bins). An extraction is right when every field
matches (exact match); the coverage curve shows its field F1 too.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from sidecar.evaluation import confidence as cf
from sidecar.evaluation import scores as sc
from sidecar.evaluation.dataset import EvalSet
from sidecar.evaluation.runner import Reply

COVERAGES = (0.5, 0.7, 0.8, 0.9)
# A reply held to this was below cloud.classify_margin: AUTO escalates it, whatever its
# confidence and whatever threshold is fitted (the daemon checks the margin first).
MARGIN = "cloud.classify_margin"
MIN_FIT_ROWS = 30  # fewer local answers than this fit a threshold to noise
CURVE_POINTS = 100
CONFUSED_LABELS = 12


@dataclass(frozen=True)
class Settings:
    """What the daemon's config says about escalating (from the config the CLI reads)."""

    threshold: float  # AUTO keeps a local answer whose confidence is at least this
    source: str = "config"  # where the threshold came from
    cloud: bool = False  # a cloud is configured
    prompt_price_per_mtok: float = 0.0
    completion_price_per_mtok: float = 0.0
    target_accuracy: float | None = None  # show the threshold that reaches this accuracy


def summarise(
    s: EvalSet, replies: Sequence[Reply], wall_s: float, settings: Settings, routing: str
) -> dict[str, Any]:
    everything = len(replies)
    unanswered = [i for i, r in enumerate(replies) if r.unanswered]
    if unanswered:
        skip = set(unanswered)
        gone = [replies[i] for i in unanswered]
        lines = [s.rows[i].line for i in unanswered]
        s = replace(s, rows=tuple(row for i, row in enumerate(s.rows) if i not in skip))
        replies = [r for i, r in enumerate(replies) if i not in skip]
    settings = applied(replies, settings)
    ok, quality = _quality(s, replies)
    local = [i for i, r in enumerate(replies) if r.local and r.score is not None]
    score = np.array([replies[i].score for i in local], np.float64)
    prob = np.array([replies[i].probability for i in local], np.float64)
    right = np.array([ok[i] for i in local], np.float64)
    errors = [r.error for r in replies if r.error]
    out: dict[str, Any] = {
        "kind": s.kind,
        "source": str(s.source),
        "task": s.task,
        "routing": routing,
        "rows": everything,
        "failed": len(errors),
        "first_error": errors[0] if errors else "",
        "unanswered": len(unanswered),
        "unanswered_lines": lines if unanswered else [],
        "first_unanswered": gone[0].error if unanswered else "",
        "models": dict(Counter(r.model for r in replies if r.model)),
        "wall_s": wall_s,
        "rows_per_s": everything / wall_s if wall_s > 0 else math.nan,
        "quality": quality,
        "confidence": _confidence(s, score, prob, right, replies, local, settings, quality),
        "latency": sc.latency([r.ms for r in replies if not r.error]),
        "queue": sc.latency([r.queue_ms for r in replies if not r.error]),
        "tokens": {
            "prompt": sum(r.prompt_tokens for r in replies),
            "completion": sum(r.completion_tokens for r in replies),
        },
        "served_by": dict(Counter(r.served_by for r in replies if not r.error)),
        "cloud_cost": sum(r.cost for r in replies),
    }
    quality.pop("row_f1", None)
    if s.kind == "classify":
        gold = [row.label for row in s.rows]
        out["confusion"] = sc.confused(gold, [r.answer for r in replies], CONFUSED_LABELS)
    done: dict[str, Any] = finite(out)
    return done


def compare(
    s: EvalSet, local: Sequence[Reply], cloud: Sequence[Reply], report: dict[str, Any]
) -> dict[str, Any]:
    """Local and cloud answers to the same rows: how often they agree, how right each is on
    the rows the cloud answered, what AUTO at the daemon's threshold would score (the cloud's
    answer below it, where there is one), and the rows the privacy rules kept local (the
    daemon refused to send them: cause "sensitive")."""
    local_ok, _ = _quality(s, local)
    cloud_ok, cloud_q = _quality(s, cloud)
    private = [i for i, r in enumerate(cloud) if r.cause == "sensitive"]
    sent = [i for i, r in enumerate(cloud) if not r.error]
    failed = [r.error for r in cloud if r.error and r.cause != "sensitive"]
    same = [_same(s, local[i], cloud[i]) for i in sent]
    threshold = report["confidence"]["at_threshold"]["threshold"]
    auto, escalated = [], []
    for i, r in enumerate(local):
        unsure = r.local and r.score is not None and threshold is not None and r.score < threshold
        if unsure and not cloud[i].error:
            escalated.append(i)
        auto.append(cloud_ok[i] if i in escalated else local_ok[i])
    return {
        "rows": len(local),
        "sent": len(sent),
        "kept_local_private": len(private),
        "private_lines": [s.rows[i].line for i in private],
        "cloud_failed": len(failed),
        "first_cloud_error": failed[0] if failed else "",
        "agreement": mean([float(x) for x in same]),
        "local_accuracy_on_sent": mean([local_ok[i] for i in sent]),
        "cloud_accuracy_on_sent": mean([cloud_ok[i] for i in sent]),
        "cloud_quality": {k: v for k, v in cloud_q.items() if k not in ("labels", "row_f1")},
        "auto_accuracy": mean(auto),
        "auto_escalated": len(escalated) / len(local) if local else math.nan,
        "auto_cloud_cost": sum(cloud[i].cost for i in escalated),
        "cloud_cost": sum(r.cost for r in cloud),
        "cloud_latency": sc.latency([r.ms for r in cloud if not r.error]),
    }


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _same(s: EvalSet, a: Reply, b: Reply) -> bool:
    if s.kind == "classify":
        return a.answer == b.answer
    x, y = a.parsed or {}, b.parsed or {}
    return all(sc.normalise(x.get(k)) == sc.normalise(y.get(k)) for k in set(x) | set(y))


def applied(replies: Sequence[Reply], settings: Settings) -> Settings:
    """The threshold the daemon says it held the replies to (a fitted one overrides the
    config's), when every local reply names the same one; else the config's."""
    seen = {
        (r.threshold, r.threshold_source)
        for r in replies
        if r.local and r.threshold is not None and r.threshold_source != MARGIN
    }
    if len(seen) != 1:
        return settings
    ((threshold, source),) = seen
    return replace(settings, threshold=threshold, source=source or "daemon")


def finite(doc: Any) -> Any:
    """`doc` with every NaN or infinity as None: an undefined figure (the AUROC of a set
    with no wrong answers) is null in JSON, which has no NaN."""
    if isinstance(doc, dict):
        return {k: finite(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [finite(v) for v in doc]
    if isinstance(doc, float) and not math.isfinite(doc):
        return None
    return doc


def _quality(s: EvalSet, replies: Sequence[Reply]) -> tuple[list[float], dict[str, Any]]:
    """Each row's correctness (1/0), and the set's quality figures."""
    if s.kind == "classify":
        gold = [row.label for row in s.rows]
        got = [r.answer if not r.error else "" for r in replies]
        return [float(g == p) for g, p in zip(gold, got, strict=True)], {
            "accuracy": sc.accuracy(gold, got),
            "macro_f1": sc.macro_f1(gold, got),
            "labels": sc.per_label(gold, got),
        }
    fields = sc.field_scores([row.expected for row in s.rows], [r.parsed for r in replies])
    quality = {k: fields[k] for k in ("exact_match", "field_f1", "fields")}
    quality["row_f1"] = fields["row_f1"]  # for the curve; not reported
    return [float(x) for x in fields["row_exact"]], quality


def _confidence(
    s: EvalSet,
    score: np.ndarray,
    prob: np.ndarray,
    right: np.ndarray,
    replies: Sequence[Reply],
    local: list[int],
    settings: Settings,
    quality: dict[str, Any],
) -> dict[str, Any]:
    n = len(score)
    steps = [k / CURVE_POINTS for k in range(1, CURVE_POINTS + 1)] if n else []
    curve = cf.coverage_curve(score, right, steps)
    if s.kind == "extract" and n:
        f1 = np.array([quality["row_f1"][i] for i in local], np.float64)
        for point, f in zip(curve, cf.coverage_curve(score, f1, steps), strict=True):
            point["field_f1"] = f["accuracy"]
    # Exact match is strict: with few exact rows its AUROC rests on a handful; a row whose
    # field F1 is at least 0.5 counts as right here, to show the ranking of the others too.
    f1_auroc = cf.separation(score, f1) if s.kind == "extract" and n else math.nan
    kept = cf.at_threshold(score, right, settings.threshold)
    below = score < settings.threshold
    est = (
        sum(
            replies[i].prompt_tokens * settings.prompt_price_per_mtok
            + replies[i].completion_tokens * settings.completion_price_per_mtok
            for i, b in zip(local, below, strict=True)
            if b
        )
        / 1e6
    )
    out = {
        "unit": "probability" if s.kind == "classify" else "mean_logprob",
        "rows": n,
        "ece": cf.expected_calibration_error(prob, right),
        "reliability": cf.reliability_bins(prob, right),
        "auroc": cf.separation(score, right),
        "auroc_field_f1": f1_auroc,
        "coverage": cf.coverage_curve(score, right, COVERAGES),
        "curve": curve,
        "at_threshold": {
            **kept,
            "source": settings.source,
            # AUTO escalates the rest, where a cloud is configured; priced at the local
            # tokens (the cloud's own count differs: an estimate).
            "escalated": 1 - kept["coverage"] if n else math.nan,
            "cloud": settings.cloud,
            "estimated_cloud_cost": est if settings.cloud else 0.0,
        },
    }
    if settings.target_accuracy is not None:
        margin = np.array([replies[i].threshold_source == MARGIN for i in local], bool)
        out["fitted"] = fit(score, right, settings.target_accuracy, margin)
    return out


def fit(
    score: np.ndarray, right: np.ndarray, target: float, by_margin: np.ndarray | None = None
) -> dict[str, Any]:
    """The threshold that keeps the most local answers at `target` accuracy, what it keeps,
    and whether it can be trusted (reached, on at least MIN_FIT_ROWS answers). `by_margin`:
    the answers AUTO escalates by cloud.classify_margin whatever the threshold; no threshold
    keeps them, so they count in the share kept as escalated, and not in its accuracy."""
    other = ~by_margin if by_margin is not None else np.ones(len(score), bool)
    got = cf.threshold_for_accuracy(score[other], right[other], target)
    share = float(other.mean()) if len(score) else 1.0
    return {
        "target": target,
        "threshold": got["threshold"] if got else math.nan,
        "coverage": got["coverage"] * share if got else 0.0,
        "accuracy": got["accuracy"] if got else math.nan,
        "reached": got is not None,
        "best_accuracy": cf.best_accuracy(score[other], right[other]),
        "rows": len(score),
        "by_margin": int(len(score) - other.sum()),
        "min_rows": MIN_FIT_ROWS,
    }


# ---------------------------------------------------------------- the terminal table


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def table(r: dict[str, Any]) -> str:
    """The report as aligned `metric  value` lines."""
    rows: list[tuple[str, str]] = []
    what = f"{r['kind']} of {r['source']}" + (f" by task {r['task']}" if r["task"] else "")
    models = ", ".join(r["models"]) or "no model answered"
    rows.append(("set", f"{what}: {r['rows']} rows, routing {r['routing']}, {models}"))
    if r["failed"]:
        rows.append(("failed requests (count as wrong)", f"{r['failed']}: {r['first_error']}"))
    if r["unanswered"]:
        lines = ", ".join(map(str, r["unanswered_lines"][:10]))
        more = ", ..." if len(r["unanswered_lines"]) > 10 else ""
        rows.append(("not answered, not scored (lines)", f"{r['unanswered']} ({lines}{more})"))
        rows.append(("  first", r["first_unanswered"]))
    q = r["quality"]
    if r["kind"] == "classify":
        rows += [("accuracy", _f(q["accuracy"])), ("macro-F1", _f(q["macro_f1"]))]
    else:
        rows += [
            ("exact match", _f(q["exact_match"])),
            ("field F1 (all fields)", _f(q["field_f1"])),
        ]
        rows += [(f"  field {k}: F1 (support)", f"{_f(v['f1'])} ({v['support']})")
                 for k, v in q["fields"].items()]  # fmt: skip
    c = r["confidence"]
    unit = "probability" if c["unit"] == "probability" else "mean token logprob"
    rows.append((f"confidence ({unit}), local rows", str(c["rows"])))
    rows.append(("  AUROC (right vs wrong)", _f(c["auroc"])))
    if r["kind"] == "extract":
        rows.append(("  AUROC (row field F1 >= 0.5 vs below)", _f(c["auroc_field_f1"])))
    rows.append(("  expected calibration error", _f(c["ece"])))
    for p in c["coverage"]:
        rows.append((f"  accuracy of the surest {p['coverage']:.0%} (t={p['threshold']:.3f})",
                     _f(p["accuracy"])))  # fmt: skip
    t = c["at_threshold"]
    rows.append((f"  at the daemon's threshold {t['threshold']:.4g} ({t['source']}): kept local / accuracy",
                 f"{_f(t['coverage'])} / {_f(t['accuracy'])}"))  # fmt: skip
    if t["cloud"]:
        rows.append(("  escalated / estimated cloud cost",
                     f"{_f(t['escalated'])} / {t['estimated_cloud_cost']:.4f}"))  # fmt: skip
    if "fitted" in c:
        fit = c["fitted"]
        if fit["reached"]:
            rows.append((f"  for accuracy {fit['target']:g}: threshold / kept local / accuracy",
                         f"{_f(fit['threshold'], '.4g')} / {_f(fit['coverage'])} / "
                         f"{_f(fit['accuracy'])}"))  # fmt: skip
        else:
            rows.append((f"  for accuracy {fit['target']:g}",
                         f"unreachable: the best any threshold keeps is {_f(fit['best_accuracy'])}"))  # fmt: skip
        if fit.get("by_margin"):
            rows.append(("  escalated by cloud.classify_margin whatever the threshold",
                         str(fit["by_margin"])))  # fmt: skip
        if fit.get("written_to"):
            rows.append(("  fitted threshold written", f"{fit['key']} in {fit['written_to']}"))
    for a in r.get("live_agreement", ()):
        rows.append((f"live agreement with the cloud, {a['key']} ({a['model']})",
                     f"{_f(a['rate'])} [{_f(a['low'])}, {_f(a['high'])}] of {a['total']} "
                     "shadow pairs"))  # fmt: skip
    lat = r["latency"]
    rows.append(
        ("latency p50 / p99 ms", f"{_f(lat['p50_ms'], '.0f')} / {_f(lat['p99_ms'], '.0f')}")
    )
    rows.append(("rows/s", _f(r["rows_per_s"], ".2f")))
    tok = r["tokens"]
    rows.append(("tokens prompt / completion", f"{tok['prompt']} / {tok['completion']}"))
    if "compare" in r:
        m = r["compare"]
        rows.append(("compare: sent to the cloud / kept local (private) / cloud failed",
                     f"{m['sent']} / {m['kept_local_private']} / {m['cloud_failed']}"))  # fmt: skip
        if m["kept_local_private"]:
            lines = ", ".join(map(str, m["private_lines"][:10]))
            rows.append(("  kept local by the privacy rules (lines)", lines))
        rows.append(("  local and cloud agree", _f(m["agreement"])))
        rows.append(("  accuracy on the rows sent: local / cloud",
                     f"{_f(m['local_accuracy_on_sent'])} / {_f(m['cloud_accuracy_on_sent'])}"))  # fmt: skip
        rows.append(("  AUTO at the daemon's threshold: escalated / accuracy / cloud cost",
                     f"{_f(m['auto_escalated'])} / {_f(m['auto_accuracy'])} / "
                     f"{m['auto_cloud_cost']:.4f}"))  # fmt: skip
        rows.append(("  cloud cost of the rows sent", f"{m['cloud_cost']:.4f}"))
        if m["cloud_failed"]:
            rows.append(("  first cloud error", m["first_cloud_error"]))
    if set(r["served_by"]) - {"local"}:
        served = ", ".join(f"{k} {v}" for k, v in sorted(r["served_by"].items()))
        rows.append(("served by", f"{served}; cloud cost {r['cloud_cost']:.4f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
