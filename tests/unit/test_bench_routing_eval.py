"""bench-routing --with-eval joins the bench's figures and `sidecar eval`'s honestly: the
rows it hands the CLI are the bench's rows in its order, the same replies give the same
figures on both sides, and a reply that differs shows up in the figures it moves."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import routing, routing_eval
from sidecar.evaluation.dataset import Columns, load
from sidecar.evaluation.runner import Reply
from sidecar.evaluation.summary import Settings, summarise

LABELS = [f"intent_{i}" for i in range(7)]
THRESHOLD = 0.7


def records(n: int = 120, seed: int = 3) -> list[dict[str, Any]]:
    """What the bench's classify_all records per row, random but fixed."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        gold = LABELS[i % len(LABELS)]
        p = round(rnd.random(), 5)
        label = gold if rnd.random() < p else LABELS[(i + 1) % len(LABELS)]
        out.append({"gold": gold, "label": label, "p": p, "ms": 5.0, "model": True,
                    "novelty": None, "oos": False})  # fmt: skip
    return out


def bench_report(res: list[dict[str, Any]]) -> dict[str, Any]:
    return routing.summarise(res, 1.0, res, 1.0, THRESHOLD)


def eval_report(tmp_path: Path, res: list[dict[str, Any]]) -> dict[str, Any]:
    """`sidecar eval`'s JSON for the same replies, read from the CSV the bench writes."""
    csv_file = tmp_path / "rows.csv"
    routing_eval.write_rows(csv_file, [(f"text {i}", r["gold"]) for i, r in enumerate(res)])
    s = load(csv_file, Columns("text", "category"), kind="classify", task="banking77")
    replies = [Reply(answer=r["label"], score=r["p"], probability=r["p"], model="demo@1",
                     threshold=THRESHOLD, threshold_source="cloud.classify_threshold")
               for r in res]  # fmt: skip
    report = summarise(s, replies, 2.0, Settings(THRESHOLD), "LOCAL_ONLY")
    return json.loads(json.dumps(report))  # as the CLI prints it


def test_the_rows_written_are_the_bench_rows_in_order_with_awkward_text(tmp_path: Path) -> None:
    rows = [("a, comma", "x"), ('a "quote"', "y"), ("two\nlines", "x"), ("ünïcode", "y")]
    routing_eval.write_rows(tmp_path / "r.csv", rows)
    s = load(tmp_path / "r.csv", Columns("text", "category"), kind="classify", task="t")
    assert [(r.text, r.label) for r in s.rows] == rows


def test_the_same_replies_give_identical_figures(tmp_path: Path) -> None:
    res = records()
    joined = routing_eval.join(bench_report(res), eval_report(tmp_path, res))
    metrics = [r["metric"].strip() for r in joined]
    for m in ("accuracy", "macro-F1", "expected calibration error", "AUROC (right vs wrong)",
              "accuracy of the surest 50%", "accuracy of the surest 90%", "kept local at it"):  # fmt: skip
        assert m in metrics
    assert all(r["diff"] is not None and r["diff"] <= routing_eval.SAME for r in joined), joined
    assert routing_eval.verdict(joined) == "identical"
    text = routing_eval.table(joined, {"rows": len(res), "task": "banking77", "eval_wall_s": 2.0,
                                       "bench_rps": 120.0, "eval_rps": 60.0})  # fmt: skip
    assert "verdict: identical" in text and "macro-F1" in text


def test_one_different_answer_shows_in_the_figures_it_moves(tmp_path: Path) -> None:
    res = records()
    theirs = [dict(r) for r in res]
    # The surest right answer turns wrong on the eval's side only.
    i = max((k for k, r in enumerate(res) if r["label"] == r["gold"]), key=lambda k: res[k]["p"])
    theirs[i]["label"] = "intent_wrong"
    joined = {r["metric"].strip(): r for r in
              routing_eval.join(bench_report(res), eval_report(tmp_path, theirs))}  # fmt: skip
    assert abs(joined["accuracy"]["diff"] - 1 / len(res)) < 1e-12
    assert joined["accuracy of the surest 50%"]["diff"] > 0
    assert joined["macro-F1"]["diff"] > 0
    assert joined["rows"]["diff"] == 0
    assert joined["threshold keeping 50%"]["diff"] == 0  # the confidences did not move
    verdict = routing_eval.verdict(list(joined.values()))
    assert verdict.startswith("differ: ") and "accuracy" in verdict and "rows," not in verdict


def test_a_coverage_point_missing_from_the_eval_is_a_difference(tmp_path: Path) -> None:
    res = records()
    ev = eval_report(tmp_path, res)
    ev["confidence"]["coverage"] = ev["confidence"]["coverage"][:-1]
    joined = routing_eval.join(bench_report(res), ev)
    missing = [r for r in joined if r["eval"] is None]
    assert [r["metric"].strip() for r in missing] == [
        "accuracy of the surest 90%",
        "threshold keeping 90%",
    ]
    assert "surest 90%" in routing_eval.verdict(joined)
