"""The low-priority mark (sidecar/domain/lanes.py) reaches every job of the request that
set it, and not the jobs of a build that request started."""

from __future__ import annotations

import asyncio

from sidecar.domain.lanes import LOW_PRIORITY, LowPriority
from sidecar.fewshot.builds import _unmarked
from sidecar.router.deadline import low_priority


async def test_a_build_started_by_a_low_priority_request_is_not_marked() -> None:
    async def seen() -> LowPriority | None:
        return LOW_PRIORITY.get()

    async def request() -> tuple[LowPriority | None, LowPriority | None]:
        own = await asyncio.ensure_future(seen())  # a job of the request: marked
        build = await asyncio.ensure_future(_unmarked(seen()))  # as Builds starts one
        return own, build

    own, build = await low_priority(request, None)
    assert own is not None and build is None
    assert LOW_PRIORITY.get() is None  # and the mark ends with the request


async def test_the_clock_starts_at_dispatch() -> None:
    async def queued_then_quick() -> str:
        await asyncio.sleep(0.3)  # waits in the queue, longer than the limit
        mark = LOW_PRIORITY.get()
        assert mark is not None
        mark.on_dispatch()
        await asyncio.sleep(0.05)
        return "done"

    async def queued_then_slow() -> str:
        mark = LOW_PRIORITY.get()
        assert mark is not None
        mark.on_dispatch()
        await asyncio.sleep(10)
        return "never"

    assert await low_priority(queued_then_quick, 0.2) == "done"
    try:
        await low_priority(queued_then_slow, 0.1)
        raise AssertionError("no timeout")
    except asyncio.TimeoutError:
        pass
