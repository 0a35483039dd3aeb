"""Blocking update work (downloads, rebuilds) off the event loop, in threads that never
hold up the daemon's exit."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """Run blocking I/O in a daemon thread. Unlike asyncio.to_thread's pool, a daemon thread
    does not hold up the daemon's exit until a long download ends; what it leaves behind is
    a partial file that the next run resumes."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result = fn(*args, **kw)
        except BaseException as e:
            loop.call_soon_threadsafe(settle, None, e)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=work, name="sidecar-update", daemon=True).start()
    return await future
