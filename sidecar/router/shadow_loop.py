"""ShadowLoop: a thread with its own event loop, where shadow calls talk to the cloud.

A shadow call costs about 9 ms of CPU in the openai SDK (building the request, httpx,
parsing the reply into its models). On the serving event loop that time came out of the
replies being served: at cloud.shadow_rate 1.0 the local reply's p99 went from 37 to
71 ms (scripts/bench-shadow). Here the SDK runs on its own loop, with its own client (an
httpx client belongs to the loop it was first used on), and the serving loop only waits
on a future. The thread still shares the GIL, but the interpreter hands it back to the
serving thread every switch interval (5 ms), instead of the serving loop running nothing
else until the call's next await. The bookkeeping (budget, counts, agreement) stays on the
serving loop, where it always was.

The thread starts with the first shadow call (a daemon with shadow_rate 0 has none) and
ends with `close`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
JOIN_S = 5.0  # close waits this long for the thread (a call is cancelled, not awaited)


class ShadowLoop:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=loop.run_forever, name="shadow-loop", daemon=True
                )
                self._thread.start()
                self._loop = loop
            return self._loop

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        """`work`'s result, run on the shadow loop; cancelling the caller cancels it there."""
        fut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(work, self._start())
        return await asyncio.wrap_future(fut)

    async def close(self, last: Coroutine[Any, Any, None] | None = None) -> None:
        """Run `last` there (closing what lives on that loop), then end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            if last is not None:
                last.close()
            return
        if last is not None:  # a client that fails to close leaves nothing to do with it
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(last, loop))
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join, JOIN_S)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None
