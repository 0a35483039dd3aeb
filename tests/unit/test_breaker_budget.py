"""The cloud circuit breaker's states and the persisted spending caps (injected clocks)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from sidecar.router.breaker import Breaker
from sidecar.router.budget import Budget, Prices


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_breaker_opens_after_n_failures_then_probes_once_and_closes() -> None:
    clock = Clock()
    b = Breaker(threshold=3, cooldown_s=10, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.failure()
    assert b.state == "closed"
    b.success()  # a success resets the count: failures must be consecutive
    for _ in range(3):
        b.failure()
    assert b.state == "open" and not b.allow() and b.opened == 1
    clock.t = 9.9
    assert not b.allow()
    clock.t = 10
    assert b.state == "half_open"
    assert b.allow() and not b.allow()  # one probe at a time
    b.failure()  # the probe failed: open again for another cooldown
    assert b.state == "open" and b.opened == 2
    clock.t = 20
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow()


def test_breaker_refuses_a_zero_threshold() -> None:
    with pytest.raises(ValueError):
        Breaker(0, 1)


class Day:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 12, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now


PRICES = Prices(prompt_per_mtok=1.0, completion_per_mtok=4.0)


def test_cost_comes_from_reported_usage() -> None:
    assert PRICES.cost(1_000_000, 0) == 1.0
    assert PRICES.cost(500, 250) == pytest.approx((500 + 1000) / 1e6)


def test_caps_survive_a_restart_and_roll_over(tmp_path: Path) -> None:
    day = Day()
    path = tmp_path / "budget.json"
    b = Budget(path, PRICES, daily_cap=0.01, monthly_cap=0.02, clock=day)
    assert b.spent() is None
    b.charge(4000, 1500)  # 0.004 + 0.006 = 0.010: the daily cap
    assert b.spent() == "daily"
    restarted = Budget(path, PRICES, daily_cap=0.01, monthly_cap=0.02, clock=day)
    assert restarted.spent() == "daily"  # persisted across the restart
    day.now += timedelta(days=1)
    assert restarted.spent() is None  # a new day
    restarted.charge(10_000, 0)  # 0.01 more: the month now has 0.02
    assert restarted.spent() == "daily"
    day.now += timedelta(days=1)
    assert restarted.spent() == "monthly"
    day.now = datetime(2026, 12, 1, tzinfo=timezone.utc)
    assert restarted.spent() is None  # a new month


def test_a_damaged_budget_file_counts_as_spent(tmp_path: Path) -> None:
    path = tmp_path / "budget.json"
    path.write_text("{not json")
    b = Budget(path, PRICES, daily_cap=1.0, clock=Day())
    assert b.spent() == "daily"
