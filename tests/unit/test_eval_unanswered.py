"""An eval row the daemon did not get to (a timeout, no worker, a full queue) is listed apart
and scored nowhere; a row it refused still counts as a wrong answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.evaluation.dataset import EvalSet, Row
from sidecar.evaluation.runner import Reply
from sidecar.evaluation.summary import Settings, summarise, table


def failed(status: str) -> Reply:
    return Reply(error=f"{status}: no", status=status)


def test_rows_not_answered_are_listed_apart_and_not_scored() -> None:
    rows = tuple(Row(f"t{i}", "a" if i % 2 else "b", line=i + 2) for i in range(8))
    s = EvalSet("classify", Path("set.csv"), rows, labels=("a", "b"))
    sure = {"score": 0.9, "probability": 0.9, "model": "m@1"}
    replies = [Reply(answer=r.label, **sure) for r in rows[:4]]  # type: ignore[arg-type]
    replies += [
        Reply(answer="a", **sure),  # type: ignore[arg-type]  # row 4's label is b: wrong
        failed("INVALID_ARGUMENT"),  # refused: the request is wrong, so is the row
        failed("DEADLINE_EXCEEDED"),
        failed("UNAVAILABLE"),
    ]
    r = summarise(s, replies, 1.0, Settings(0.7), "LOCAL_ONLY")
    assert r["rows"] == 8 and r["failed"] == 1 and r["unanswered"] == 2
    assert r["unanswered_lines"] == [8, 9]
    assert r["first_unanswered"] == "DEADLINE_EXCEEDED: no"
    assert r["quality"]["accuracy"] == pytest.approx(4 / 6)  # not 4 / 8
    text = table(r)
    assert "not answered, not scored (lines)" in text and "2 (8, 9)" in text
