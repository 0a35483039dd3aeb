"""The restart policy (engine/restarts.py): when a dead worker is started again."""

from __future__ import annotations

from sidecar.engine.restarts import (
    BACKOFF_MAX_S,
    BACKOFF_START_S,
    BLAMED_FREE,
    BLAMED_WINDOW_S,
    HEALTHY_RESET_S,
    RestartPolicy,
)


def test_workers_that_keep_dying_young_wait_longer_each_time_up_to_the_cap() -> None:
    p = RestartPolicy()
    delays = [
        p.after_death(now=100.0 + i, started_at=100.0 + i - 1, blamed=False) for i in range(10)
    ]
    assert delays[:3] == [BACKOFF_START_S * 2, BACKOFF_START_S * 4, BACKOFF_START_S * 8]
    assert delays == sorted(delays) and delays[-1] == BACKOFF_MAX_S
    assert p.backoff_s == BACKOFF_MAX_S


def test_a_worker_that_lived_long_enough_restarts_fast_again() -> None:
    p = RestartPolicy()
    for i in range(6):
        p.after_death(now=10.0 + i, started_at=10.0 + i - 1, blamed=False)
    assert p.after_death(now=1000.0, started_at=1000.0 - HEALTHY_RESET_S - 1, blamed=False) == (
        BACKOFF_START_S
    )


def test_deaths_a_request_explains_restart_at_once_a_few_times_per_window() -> None:
    p = RestartPolicy()
    free = [
        p.after_death(now=50.0 + i, started_at=49.0 + i, blamed=True) for i in range(BLAMED_FREE)
    ]
    assert free == [0.0] * BLAMED_FREE and p.backoff_s == BACKOFF_START_S
    # One more in the same window: many different killer requests, so a crash loop slows down.
    assert p.after_death(now=50.0 + BLAMED_FREE, started_at=49.0, blamed=True) > BACKOFF_START_S
    # Once the window has passed, blamed deaths are free again.
    later = 50.0 + BLAMED_WINDOW_S + BLAMED_FREE + 1
    assert p.after_death(now=later, started_at=later - 1, blamed=True) == 0.0


def test_a_replacement_that_fails_to_start_waits_longer_each_try() -> None:
    p = RestartPolicy()
    waits = [0.0]
    for _ in range(8):
        waits.append(p.after_failed_start(waits[-1]))
    assert waits[1] == BACKOFF_START_S * 2  # even after an immediate restart
    assert waits[1:] == sorted(waits[1:]) and waits[-1] == BACKOFF_MAX_S == p.backoff_s
