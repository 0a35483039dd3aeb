"""The supervisor: the daemon's slow loop beside the request path.

Each tick it kills workers that stopped answering pings, retires workers over their RSS
ceiling between requests, sheds new load when the system runs short of memory, re-proves
readiness with a one-token generation now and then, publishes readiness to the health
service, unloads on-demand models idle past their keep_alive, and pets the systemd
watchdog. Signal handlers never do any of this; they only
set events.

What the tick does not do is restart dead workers: a death arrives as an event (the
worker's pipe closes), and the pool that saw it, the only part that knows which request
the worker ran, replaces it when the restart policy says (engine/restarts.py), at once for
a death a request explains, with backoff otherwise, without waiting for a tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import psutil

from sidecar.config import ServerConfig
from sidecar.engine.local import PoolEngine
from sidecar.engine.residency import LOADED

log = logging.getLogger("sidecar.supervisor")

MiB = 1024 * 1024
SetReady = Callable[[dict[str, bool]], Awaitable[None]]


class Supervisor:
    def __init__(
        self,
        engine: PoolEngine,
        server: ServerConfig,
        publish: SetReady,
        heartbeat: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.server = server
        self._publish = publish
        self._heartbeat = heartbeat
        self.probe_errors: dict[str, str | None] = {name: None for name in engine.pools}
        self._published: dict[str, bool] | None = None
        self._probing: asyncio.Task[None] | None = None
        self.ticks = 0

    async def run(self, stop: asyncio.Event) -> None:
        next_probe = time.monotonic() + self.server.probe_interval_seconds
        try:
            while not stop.is_set():
                now = time.monotonic()
                self.tick(now)
                if now >= next_probe and (self._probing is None or self._probing.done()):
                    self._probing = asyncio.create_task(self._probe_all())
                    next_probe = now + self.server.probe_interval_seconds
                await self.publish()
                if self._heartbeat is not None:
                    self._heartbeat()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.server.ping_interval_seconds)
        finally:
            if self._probing is not None:
                self._probing.cancel()

    def tick(self, now: float) -> None:
        self.ticks += 1
        for pool in self.engine.pools.values():
            pool.supervise(now, self.server.hang_seconds)
        self.engine.shed_reason = self._memory_pressure()
        self.engine.unload_idle(now)

    def _memory_pressure(self) -> str | None:
        floor = self.server.min_available_mb * MiB
        available = psutil.virtual_memory().available
        if floor and available < floor:
            return (
                f"system memory is low ({available // MiB} MiB available, "
                f"server.min_available_mb is {floor // MiB}): retry in a few seconds"
            )
        return None

    async def _probe_all(self) -> None:
        names = list(self.engine.pools)
        results = await asyncio.gather(
            *(
                asyncio.wait_for(self.engine.pools[n].probe(), self.server.hang_seconds)
                for n in names
            ),
            return_exceptions=True,
        )
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                result = f"readiness probe failed: {type(result).__name__}"
            if result != self.probe_errors.get(name):
                log.log(
                    logging.WARNING if result else logging.INFO,
                    "model %s readiness probe: %s",
                    name,
                    result or "ok",
                )
            self.probe_errors[name] = result
        await self.publish()

    def readiness(self) -> dict[str, bool]:
        """Per model. An on-demand model that is not loaded counts as ready: a request
        loads it (its state shows in status); a failed load fails those requests."""
        return {
            name: (pool.ready or pool.residency != LOADED) and not self.probe_errors.get(name)
            for name, pool in self.engine.pools.items()
        }

    async def publish(self) -> None:
        ready = self.readiness()
        if ready != self._published:
            self._published = ready
            await self._publish(ready)
