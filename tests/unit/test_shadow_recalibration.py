"""tasks.NAME.target_accuracy: the threshold chosen from shadow pairs (the cloud's answer
taken as right), within bounds, only from enough pairs, and what the router then uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.config import CloudConfig
from sidecar.domain.types import ModelRef
from sidecar.router.breaker import Breaker
from sidecar.router.budget import Budget, Prices
from sidecar.router.engine import NoTasks, RouterEngine
from sidecar.router.outbound import Gate
from sidecar.router.privacy import Scanner
from sidecar.router.shadow import MIN_RECALIBRATION_SAMPLES, Shadow

KEY, MODEL = "task:t", "m@abc"


def answered_by(model: str) -> Any:
    """A local result as `_threshold` reads it: only the model that answered matters."""
    name, _, version = model.partition("@")
    return type("Answer", (), {"model": ModelRef(name, version)})()


def shadow_with(tmp_path: Path, pairs: list[tuple[float, bool]]) -> Shadow:
    s = Shadow(tmp_path, Budget(tmp_path / "b.json", Prices(0, 0)), 1.0)
    for conf, agreed in pairs:
        s.record(KEY, MODEL, agreed, conf, {"text": "x"})
    return s


# 60 pairs at 0.9, all agreeing; 40 at 0.6, half agreeing.
MIXED = [(0.9, True)] * 60 + [(0.6, i % 2 == 0) for i in range(40)]


@pytest.mark.parametrize(
    ("pairs", "target", "threshold", "clamped"),
    [
        (MIXED, 0.95, 0.9, ""),  # only the sure ones reach 0.95
        (MIXED, 0.75, 0.6, ""),  # all 100 kept: 80 agree
        ([(0.3, True)] * 60, 0.9, 0.5, "at the lower bound"),
        ([(0.995, True)] * 60, 0.9, 0.99, "at the upper bound"),
        ([(0.9, False)] * 60, 0.9, 0.99, "target unreachable"),  # send as much as it may
    ],
)
def test_the_threshold_is_the_lowest_that_reaches_the_target_within_bounds(
    tmp_path: Path, pairs: list[tuple[float, bool]], target: float, threshold: float, clamped: str
) -> None:
    got = shadow_with(tmp_path, pairs).recalibrated(KEY, MODEL, target)
    assert got is not None
    assert (got.threshold, got.clamped, got.samples) == (threshold, clamped, len(pairs))
    assert f"from {len(pairs)} pairs of {MODEL}" in got.describe()


def test_no_choice_before_enough_pairs_and_a_new_pair_is_taken_into_account(tmp_path: Path) -> None:
    s = shadow_with(tmp_path, [(0.9, True)] * (MIN_RECALIBRATION_SAMPLES - 1))
    assert s.recalibrated(KEY, MODEL, 0.9) is None
    assert s.explain(KEY, MODEL, 0.9) == "waiting: 49 of 50 pairs for target accuracy 0.9"
    assert s.recalibrated(KEY, "m@other", 0.9) is None  # per model version
    s.record(KEY, MODEL, True, 0.7, {})
    got = s.recalibrated(KEY, MODEL, 0.9)
    assert got is not None and got.threshold == 0.7
    s.record(KEY, MODEL, False, 0.7, {})  # 0.7 now keeps 50 of 51 right: 0.98
    s.record(KEY, MODEL, False, 0.7, {})  # ... 50 of 52: 0.96
    s.record(KEY, MODEL, False, 0.7, {})  # ... 50 of 53: 0.94 < 0.95
    got = s.recalibrated(KEY, MODEL, 0.95)
    assert got is not None and got.threshold == 0.9 and got.accuracy == 1.0
    assert s.explain(KEY, MODEL, 0.95).startswith("0.9 for target accuracy 0.95 from 53 pairs")


class Targets(NoTasks):
    def __init__(self, target: float | None, own: float | None = None) -> None:
        self.target, self.own = target, own

    def target_accuracy(self, task: str) -> float | None:
        return self.target if task == "t" else None

    def threshold(self, task: str) -> float | None:
        return self.own


def router(tmp_path: Path, tasks: Any, shadow: Shadow) -> RouterEngine:
    budget = Budget(tmp_path / "main.json", Prices(0, 0))
    return RouterEngine(object(), CloudConfig(), breaker=Breaker(3, 60), budget=budget,  # type: ignore[arg-type]
                        gate=Gate(Scanner(), False), cloud=None, tasks=tasks,
                        shadow=shadow)  # fmt: skip


def test_the_router_holds_a_task_to_the_chosen_threshold_over_its_own(tmp_path: Path) -> None:
    sh = shadow_with(tmp_path, MIXED)
    r = router(tmp_path, Targets(0.95, own=0.4), sh)
    threshold, source = r._threshold("classify", "t", answered_by(MODEL))
    assert threshold == 0.9
    assert source == f"shadow ({KEY}: target accuracy 0.95 from 100 pairs of {MODEL})"
    # Another model version has no pairs yet; no target set: the task's own threshold.
    assert r._threshold("classify", "t", answered_by("m@new")) == (0.4, "tasks.t.threshold")
    r = router(tmp_path, Targets(None, own=0.4), sh)
    assert r._threshold("classify", "t", answered_by(MODEL)) == (0.4, "tasks.t.threshold")
