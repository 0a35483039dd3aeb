"""Reservations against the spending caps: held at once, settled to the reported cost,
released on failure, and forgotten when the day rolls over."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from sidecar.router.budget import Budget, Prices, Reservation

PRICES = Prices(prompt_per_mtok=1.0, completion_per_mtok=0.0)


class Day:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 12, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now


def test_holds_count_against_the_cap_until_settled(tmp_path: Path) -> None:
    b = Budget(tmp_path / "b.json", PRICES, daily_cap=0.003, clock=Day())
    held = [b.reserve(1000, 0) for _ in range(5)]  # 0.001 each, none spent yet
    assert [isinstance(h, Reservation) for h in held] == [True, True, True, False, False]
    assert held[3] == "daily" and b.spent() == "daily" and b.spent_day == 0.0
    first, second, third = (h for h in held if isinstance(h, Reservation))
    assert b.settle(first, 400, 0) == pytest.approx(0.0004)  # cheaper than held
    assert b.settle(first, 400, 0) == 0.0  # once only
    b.settle(second, 0, 0)  # the call failed: nothing charged, the hold released
    assert b.spent_day == pytest.approx(0.0004) and b.spent() is None
    assert isinstance(b.reserve(1000, 0), Reservation)
    b.settle(third, 1000, 0)
    assert b.spent_day == pytest.approx(0.0014)


def test_yesterdays_holds_do_not_block_today(tmp_path: Path) -> None:
    day = Day()
    b = Budget(tmp_path / "b.json", PRICES, daily_cap=0.001, monthly_cap=0.01, clock=day)
    h = b.reserve(1000, 0)
    assert isinstance(h, Reservation) and b.spent() == "daily"
    day.now += timedelta(days=1)
    assert b.spent() is None  # the hold still counts for the month, not for today
    b.settle(h, 1000, 0)
    assert b.spent_day == pytest.approx(0.001)  # charged when the cost became known


def test_the_monthly_cap_holds_too(tmp_path: Path) -> None:
    b = Budget(tmp_path / "b.json", PRICES, monthly_cap=0.002, clock=Day())
    assert isinstance(b.reserve(1500, 0), Reservation)
    assert b.reserve(1500, 0) == "monthly"  # would not fit beside the first
    assert isinstance(b.reserve(500, 0), Reservation)
    assert b.reserve(1, 0) == "monthly"


def test_a_call_too_big_to_fit_beside_the_calls_in_flight_waits_its_turn(tmp_path: Path) -> None:
    b = Budget(tmp_path / "b.json", PRICES, daily_cap=0.01, clock=Day())
    small = b.reserve(1000, 0)  # 0.001 held
    assert isinstance(small, Reservation)
    # 0.05 worst case: it would take the room every other call needs while it runs.
    assert b.reserve(50_000, 0) == "daily"
    assert isinstance(b.reserve(1000, 0), Reservation)  # small calls still go
    b2 = Budget(tmp_path / "b2.json", PRICES, daily_cap=0.01, clock=Day())
    alone = b2.reserve(50_000, 0)  # alone it may go: its real cost is what gets charged
    assert isinstance(alone, Reservation)
    assert b2.reserve(1000, 0) == "daily"  # and while it runs, nothing else fits


def test_an_answer_without_usage_is_charged_its_reservation(tmp_path: Path) -> None:
    b = Budget(tmp_path / "b.json", PRICES, daily_cap=0.003, clock=Day())
    h = b.reserve(1000, 0)
    assert isinstance(h, Reservation)
    # The server answered but reported no `usage`: a cap must still hold.
    assert b.settle(h, 0, 0, answered=1) == pytest.approx(0.001)
    assert b.spent_day == pytest.approx(0.001)
    failed = b.reserve(1000, 0)
    assert isinstance(failed, Reservation)
    assert b.settle(failed, 0, 0) == 0.0  # no answer: released, nothing charged


def test_new_caps_and_prices_apply_live_and_keep_what_was_spent(tmp_path: Path) -> None:
    b = Budget(tmp_path / "b.json", PRICES, daily_cap=0.003, clock=Day())
    in_flight = b.reserve(1000, 0)
    assert isinstance(in_flight, Reservation)
    b.charge(2000, 0)  # 0.002 spent, 0.001 held: the cap is reached
    assert b.spent() == "daily"
    b.set_limits(Prices(prompt_per_mtok=2.0, completion_per_mtok=0.0), 0.01, 0.0)
    assert b.spent_day == pytest.approx(0.002) and b.spent() is None  # spending kept
    assert b.charge(1000, 0) == pytest.approx(0.002)  # the new price
    assert b.settle(in_flight, 1000, 0) == pytest.approx(0.002)  # held at the old, paid at the new
    b.set_limits(PRICES, daily_cap=0.005, monthly_cap=0.0)  # lowered below the spending
    assert b.spent_day == pytest.approx(0.006) and b.spent() == "daily"
    assert b.reserve(1, 0) == "daily"
