"""The residency policy: idle unload after keep_alive, and room in the memory budget."""

from __future__ import annotations

from dataclasses import replace

import pytest

from sidecar.domain.errors import FailedPrecondition, Overloaded
from sidecar.engine.residency import (
    NEVER,
    Resident,
    expired,
    idle_s,
    make_room,
    unload_in,
)

MiB = 1024 * 1024


def model(name: str, **kw: object) -> Resident:
    base = Resident(
        name=name,
        state="loaded",
        on_demand=True,
        keep_alive_s=60.0,
        last_used=100.0,
        in_flight=0,
        footprint=100 * MiB,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_an_idle_on_demand_model_counts_down_its_keep_alive() -> None:
    m = model("a")
    assert idle_s(m, 130.0) == 30.0
    assert unload_in(m, 130.0) == 30.0
    assert unload_in(m, 500.0) == 0.0


def test_a_model_with_requests_in_flight_is_never_idle() -> None:
    m = model("a", in_flight=1)
    assert idle_s(m, 1000.0) == 0.0
    assert unload_in(m, 1000.0) == 60.0
    assert expired([m], 1000.0) == []


@pytest.mark.parametrize(
    "kw",
    [{"on_demand": False}, {"keep_alive_s": 0.0}, {"state": "unloaded"}, {"state": "loading"}],
    ids=["loaded_at_start", "keep_alive_0", "unloaded", "loading"],
)
def test_no_idle_unload_is_scheduled_for(kw: dict[str, object]) -> None:
    m = model("a", **kw)
    assert unload_in(m, 10_000.0) == NEVER
    assert expired([m], 10_000.0) == []


def test_expired_names_the_models_past_keep_alive_oldest_first_and_skips_busy_ones() -> None:
    ms = [
        model("fresh", last_used=990.0),
        model("old", last_used=10.0),
        model("older", last_used=5.0),
        model("swapping", last_used=1.0, busy=True),
    ]
    assert expired(ms, 1000.0) == ["older", "old"]


def test_no_budget_means_nothing_is_unloaded() -> None:
    assert make_room([model("a"), model("b")], "c", 10_000 * MiB, 0) == []


def test_a_model_that_fits_beside_the_loaded_ones_unloads_nothing() -> None:
    assert make_room([model("a")], "b", 100 * MiB, 250) == []


def test_room_is_made_by_unloading_the_least_recently_used_idle_models_first() -> None:
    ms = [model("recent", last_used=90.0), model("oldest", last_used=10.0),
          model("middle", last_used=50.0)]  # fmt: skip
    assert make_room(ms, "new", 100 * MiB, 250) == ["oldest", "middle"]


def test_a_model_with_requests_in_flight_is_never_unloaded_for_room() -> None:
    ms = [model("busy", last_used=1.0, in_flight=2), model("idle", last_used=50.0)]
    assert make_room(ms, "new", 100 * MiB, 200) == ["idle"]
    with pytest.raises(Overloaded, match="busy"):
        make_room([model("busy", in_flight=1)], "new", 100 * MiB, 150)


def test_models_loading_or_unloading_hold_their_memory_but_are_not_chosen() -> None:
    ms = [model("loading", state="loading"), model("idle", last_used=50.0)]
    with pytest.raises(Overloaded):
        make_room(ms, "new", 100 * MiB, 150)
    assert make_room([model("gone", state="unloaded")], "new", 100 * MiB, 100) == []


def test_a_model_bigger_than_the_whole_budget_is_refused_with_the_key_named() -> None:
    with pytest.raises(FailedPrecondition, match=r"server\.max_model_memory_mb"):
        make_room([], "huge", 300 * MiB, 200)
