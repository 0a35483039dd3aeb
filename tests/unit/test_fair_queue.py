from __future__ import annotations

import pytest

from sidecar.domain.errors import Overloaded
from sidecar.engine.fair_queue import FairQueue


def drain(q: FairQueue[str]) -> list[str]:
    out = []
    while (item := q.pop()) is not None:
        out.append(item)
    return out


def test_callers_take_turns_so_a_burst_cannot_starve_others() -> None:
    q: FairQueue[str] = FairQueue(100)
    for i in range(5):
        q.put("busy", f"busy{i}")
    q.put("quiet", "quiet0")
    q.put("other", "other0")
    assert drain(q) == ["busy0", "quiet0", "other0", "busy1", "busy2", "busy3", "busy4"]


def test_each_caller_keeps_its_own_order() -> None:
    q: FairQueue[str] = FairQueue(100)
    for i in range(3):
        q.put("a", f"a{i}")
        q.put("b", f"b{i}")
    assert drain(q) == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_full_queue_refuses_at_once() -> None:
    q: FairQueue[str] = FairQueue(2)
    q.put("a", "1")
    q.put("b", "2")
    with pytest.raises(Overloaded, match="full"):
        q.put("c", "3")
    assert len(q) == 2


def test_remove_frees_room_and_drops_empty_callers() -> None:
    q: FairQueue[str] = FairQueue(2)
    q.put("a", "1")
    q.put("b", "2")
    assert q.remove("1")
    assert not q.remove("1")
    q.put("c", "3")
    assert drain(q) == ["2", "3"]


def test_background_work_waits_until_no_live_request_does() -> None:
    q: FairQueue[str] = FairQueue(10)
    q.put("builder", "b0", background=True)
    q.put("builder", "b1", background=True)
    q.put("app", "live0")
    assert q.pop() == "live0"
    q.put("other", "live1")
    assert drain(q) == ["live1", "b0", "b1"]


def test_a_full_background_lane_never_refuses_a_live_request() -> None:
    q: FairQueue[str] = FairQueue(2, background_limit=2)
    q.put("a", "b0", background=True)
    q.put("b", "b1", background=True)
    with pytest.raises(Overloaded, match="background"):
        q.put("c", "b2", background=True)
    q.put("app", "live0")
    q.put("app", "live1")
    assert len(q) == 4 and q.background == 2
    assert q.remove("b1") and q.background == 1


def test_pop_can_leave_background_work_waiting() -> None:
    q: FairQueue[str] = FairQueue(10)
    q.put("builder", "b0", background=True)
    assert q.pop(background=False) is None
    q.put("app", "live0")
    assert q.pop(background=False) == "live0"
    assert q.pop() == "b0"


def test_low_priority_requests_have_their_own_bound_apart_from_build_work() -> None:
    q: FairQueue[str] = FairQueue(2, background_limit=10)
    q.put("eval", "low0", background=True, request=True)
    q.put("eval", "low1", background=True, request=True)
    with pytest.raises(Overloaded, match="2 low-priority requests waiting"):
        q.put("eval", "low2", background=True, request=True)
    for i in range(5):  # build work still gets in: its bound is the backstop
        q.put("builder", f"build{i}", background=True)
    q.put("app", "live0")  # and live requests are not refused for any of it
    q.put("app", "live1")
    assert q.low_requests == 2
    assert q.pop() == "live0" and q.pop() == "live1" and q.pop() == "low0"
    q.put("eval", "low3", background=True, request=True)  # one left: room for one more
    assert q.remove("low1") and q.low_requests == 1
