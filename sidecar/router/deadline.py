"""The local timeout of a low-priority request: counted from when a worker takes it.

`cloud.local_timeout_seconds` bounds how long AUTO waits for the local model before the
cloud answers instead. A live request waits in the queue only behind other live ones
(bounded by max_queue), so its wait is part of what the caller feels; a low-priority one
waits for the live lane to empty by design (an eval beside live traffic), and counting that
wait would escalate it, at a cost, for waiting as asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sidecar.domain.lanes import LOW_PRIORITY, LowPriority

T = TypeVar("T")


async def low_priority(work: Callable[[], Awaitable[T]], limit: float | None) -> T:
    """Run `work` marked as a caller's low-priority request; with `limit`, raise
    asyncio.TimeoutError (the work cancelled) `limit` seconds after its first job left the
    queue."""
    if limit is None:
        token = LOW_PRIORITY.set(LowPriority())
        try:
            return await work()
        finally:
            LOW_PRIORITY.reset(token)
    dispatched = asyncio.Event()
    token = LOW_PRIORITY.set(LowPriority(dispatched.set))
    try:
        running = asyncio.ensure_future(work())  # its own copy of the context, marked
    finally:
        LOW_PRIORITY.reset(token)
    waiting = asyncio.ensure_future(dispatched.wait())
    try:
        await asyncio.wait({running, waiting}, return_when=asyncio.FIRST_COMPLETED)
        return await asyncio.wait_for(running, limit)
    finally:
        waiting.cancel()
        running.cancel()  # nothing when it ended; else (we were cancelled) the pool frees it
