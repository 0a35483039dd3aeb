"""The threshold fitted by `sidecar eval` counts the answers cloud.classify_margin
escalates (the daemon checks the margin before any threshold) as escalated: the share it
says a threshold keeps local is what AUTO keeps, not more."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.evaluation.dataset import EvalSet, Row
from sidecar.evaluation.runner import Reply
from sidecar.evaluation.summary import Settings, summarise, table


def test_answers_under_the_margin_are_never_counted_as_kept_by_the_fit() -> None:
    rows = tuple(Row(f"t{i}", "a") for i in range(40))
    s = EvalSet("classify", Path("set.csv"), rows, labels=("a", "b"))

    def reply(i: int) -> Reply:
        held = (0.2, "cloud.classify_margin") if i < 8 else (0.7, "cloud.classify_threshold")
        return Reply(answer="a", score=0.9, probability=0.9, model="m@1", threshold=held[0],
                     threshold_source=held[1])  # fmt: skip

    r = summarise(s, [reply(i) for i in range(40)], 1.0, Settings(0.7, target_accuracy=0.9),
                  "LOCAL_ONLY")  # fmt: skip
    fit = r["confidence"]["fitted"]
    assert fit["reached"] and fit["threshold"] == 0.9
    assert fit["coverage"] == pytest.approx(32 / 40)  # not 1.0: 8 escalate by the margin
    assert fit["accuracy"] == 1.0 and fit["rows"] == 40 and fit["by_margin"] == 8
    # the daemon's threshold is the one it held the other answers to, not the margin
    assert r["confidence"]["at_threshold"]["source"] == "cloud.classify_threshold"
    assert "escalated by cloud.classify_margin whatever the threshold" in table(r)
