"""The shadow traffic's pure parts: the Wilson interval, what agreeing means, and the store
(agreement counts that survive a restart, a bounded ring of disagreements)."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import pytest

from sidecar.domain.types import Classification, Extraction, TokenConfidence, Usage
from sidecar.router.budget import Budget, Prices
from sidecar.router.shadow import (
    AGREEMENT_FILE,
    Shadow,
    agree,
    file_for,
    known_keys,
    read_disagreements,
    wilson,
)


def _score_bound(agreed: int, total: int, upper: bool) -> float:
    """The Wilson bound by its definition, found by bisection: the p at which the score
    test |p_hat - p| <= z sqrt(p (1 - p) / n) stops accepting, on one side of p_hat."""
    z, phat = 1.959963984540054, agreed / total
    inside = lambda p: abs(phat - p) <= z * math.sqrt(p * (1 - p) / total)  # noqa: E731
    lo, hi = (phat, 1.0) if upper else (0.0, phat)
    if inside(hi if upper else lo):
        return hi if upper else lo
    for _ in range(100):
        mid = (lo + hi) / 2
        if inside(mid) == upper:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@pytest.mark.parametrize(("agreed", "total"), [(95, 100), (1, 1), (0, 10), (50, 100), (7, 9)])
def test_wilson_interval_inverts_the_score_test(agreed: int, total: int) -> None:
    low, high = wilson(agreed, total)
    assert low == pytest.approx(_score_bound(agreed, total, upper=False), abs=1e-9)
    assert high == pytest.approx(_score_bound(agreed, total, upper=True), abs=1e-9)
    assert low < agreed / total <= high or (agreed == 0 and low == 0)


def test_wilson_with_no_samples_says_nothing_is_known() -> None:
    assert wilson(0, 0) == (0.0, 1.0)


def label(x: str) -> Classification:
    return Classification(x, (), Usage(0, 0))


def extraction(text: str) -> Extraction:
    return Extraction(text, Usage(0, 0), TokenConfidence(0.0, 0.0))


def test_agreement_is_the_same_label_or_the_same_json_object() -> None:
    assert agree(label("a"), label("a")) and not agree(label("a"), label("b"))
    assert agree(extraction('{"a": 1, "b": [2]}'), extraction('{"b":[2],"a":1}'))
    assert not agree(extraction('{"a": 1}'), extraction('{"a": 2}'))
    assert not agree(extraction("not json"), extraction("not json"))
    assert not agree(label("a"), extraction('"a"'))


def shadow(where: Path, keep: int = 3) -> Shadow:
    clock = lambda: datetime(2026, 1, 2, tzinfo=timezone.utc)  # noqa: E731
    return Shadow(where, Budget(where / "b.json", Prices(1, 1), clock=clock), 1.0, keep=keep)


def test_disagreements_are_a_bounded_ring_and_counts_survive_a_restart(tmp_path: Path) -> None:
    s = shadow(tmp_path)
    for i in range(10):
        s.record("task:t", "m@1", False, 0.5, {"text": f"q{i}", "local": "a", "cloud": "b"})
    s.record("task:t", "m@1", True, 0.9, {"text": "same"})
    path = file_for(tmp_path, "task:t")
    assert len(path.read_text().splitlines()) < 2 * 3  # cut back whenever it doubles
    assert [r["text"] for r in read_disagreements(tmp_path, "task:t", 3)] == ["q7", "q8", "q9"]
    s.flush()  # as the router's close does
    again = shadow(tmp_path)  # a restart
    (pair,) = again.report()
    assert (pair.key, pair.model, pair.agreed, pair.total) == ("task:t", "m@1", 1, 11)
    assert again.pairs["task:t|m@1"].samples[-1] == (0.9, True)
    again.record("task:t", "m@1", False, None, {"text": "q10"})  # no confidence: no sample
    assert read_disagreements(tmp_path, "task:t", 3)[-1]["text"] == "q10"
    assert len(again.pairs["task:t|m@1"].samples) == 11
    assert known_keys(tmp_path) == ["task:t"]


def test_a_line_cut_short_and_a_damaged_agreement_file_are_survived(tmp_path: Path) -> None:
    s = shadow(tmp_path)
    s.record("extract:m", "m@1", False, -0.2, {"text": "x"})
    with file_for(tmp_path, "extract:m").open("a") as f:
        f.write('{"text": "cut sh')  # the daemon stopped mid-write
    assert [r["text"] for r in read_disagreements(tmp_path, "extract:m")] == ["x"]
    (tmp_path / AGREEMENT_FILE).write_text("{not json")
    fresh = shadow(tmp_path)
    assert fresh.report() == [] and known_keys(tmp_path) == []
    fresh.record("extract:m", "m@1", True, -0.1, {})
    assert (
        json.loads((tmp_path / AGREEMENT_FILE).read_text())["pairs"]["extract:m|m@1"]["total"] == 1
    )


def test_keys_that_differ_only_in_odd_characters_get_different_files(tmp_path: Path) -> None:
    assert file_for(tmp_path, "task:a/b") != file_for(tmp_path, "task:a:b")
    assert file_for(tmp_path, "task:../x").parent == tmp_path / "disagreements"


def test_the_rate_is_a_share_of_draws() -> None:
    draws = iter([0.01, 0.5, 0.019, 0.99])
    s = Shadow(Path("/nonexistent"), Budget(Path("/nonexistent/b"), Prices(0, 0)), 0.02,
               draw=lambda: next(draws))  # fmt: skip
    assert [s.wanted() for _ in range(4)] == [True, False, True, False]
    s.rate = 0.0
    assert not s.wanted()


def test_the_agreement_file_is_written_at_most_every_few_seconds_and_at_flush(
    tmp_path: Path,
) -> None:
    s = shadow(tmp_path)
    s.record("task:t", "m@1", True, 0.9, {})
    s.record("task:t", "m@1", True, 0.9, {})  # within SAVE_EVERY_S of the first write
    on_disk = lambda: json.loads((tmp_path / AGREEMENT_FILE).read_text())["pairs"]  # noqa: E731
    assert on_disk()["task:t|m@1"]["total"] == 1
    s.flush()
    assert on_disk()["task:t|m@1"]["total"] == 2


def test_the_shadow_budget_is_saved_only_when_asked(tmp_path: Path) -> None:
    b = Budget(tmp_path / "b.json", Prices(1e6, 1e6), 10.0, autosave=False)
    r = b.reserve(1, 1)
    assert not isinstance(r, str)
    assert b.settle(r, 2, 1) == 3.0 and not (tmp_path / "b.json").exists()
    s = Shadow(tmp_path, b, 1.0)
    s.save_budget(b.state())
    again = Budget(tmp_path / "b.json", Prices(1, 1), 10.0)
    assert again.spent_day == again.spent_month == 3.0
