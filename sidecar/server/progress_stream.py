"""A long admin operation (a swap, an update) streamed to its caller as progress messages.

The operation runs as its own task, not in the call: a swap runs to its end even if its
caller leaves (half a swap helps nobody), and so does an update once it installs. The
call only drains the operation's progress into the stream, then sends its result. An
error the operation raises surfaces in the call, where the interceptor maps it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

from sidecar.calls.accounting import outlives_call
from sidecar.domain.progress import Progress

T = TypeVar("T")
M = TypeVar("M")

# How often the drain looks again when the operation is quiet (it also wakes when it ends).
POLL_S = 0.05


async def progress_stream(
    operation: Callable[[Progress], Coroutine[Any, Any, T]],
    step: Callable[[str, str, int, int, float], M],
    done: Callable[[T, float], M],
    *,
    on_leave: Callable[[], object] = lambda: None,
) -> AsyncIterator[M]:
    """Start `operation(progress)`, yield `step(stage, detail, done, total, elapsed_ms)` for
    each report it makes, then `done(result, elapsed_ms)`. If the caller leaves first,
    `on_leave()` runs (an update stops its download there) and the operation goes on; its
    outcome is logged when it ends (see `accounting.outlives_call`)."""
    started = time.monotonic()
    updates: asyncio.Queue[M] = asyncio.Queue()

    def elapsed_ms() -> float:
        return (time.monotonic() - started) * 1000

    def progress(stage: str, detail: str = "", done: int = 0, total: int = 0) -> None:
        updates.put_nowait(step(stage, detail, done, total, elapsed_ms()))

    work = outlives_call(asyncio.ensure_future(operation(progress)))
    try:
        while not work.done() or not updates.empty():
            if updates.empty():
                await asyncio.wait({work}, timeout=POLL_S)
                continue
            yield updates.get_nowait()
    finally:
        if not work.done():
            on_leave()
            # Nobody awaits it now: its error is for the log (the interceptor's), not Python's
            # "exception was never retrieved".
            work.add_done_callback(lambda t: t.cancelled() or t.exception())
    yield done(work.result(), elapsed_ms())  # a refusal raises here
