"""The daemon side of updates: check a model's origin, fetch, rebuild, install, swap, watch.

One sequence per model, never two at once:

1. Fetch `<origin>/<name>.manifest.json` (size-capped) and verify it (signature by the
   configured key, name, expiry, never older than a version already trusted).
2. Plan the cheapest download: a chain of deltas from any version the store holds, or
   the full file (`plan.cheapest`).
3. Fetch each piece into `<store>/updates/<name>/` as a `.partial` file. Downloads resume
   (HTTP Range) after a cut or a restart: the partial file is the only state they need.
4. Rebuild with bounded memory (`delta.apply_delta`), check the sha256 of every step
   against the manifest; a delta that fails is remembered and the full file is fetched
   instead, by itself.
5. Install: the verified file enters the store (validated as GGUF there) and the hot-swap
   path proves it (canary) before anyone is served by it.
6. Probation: if a worker of the new version dies or a readiness probe fails within
   `update.healthy_seconds`, the previous version is swapped back and the reason kept
   (an adapter's too: `adapter_update`).

Every download has a total deadline and a rate floor (`update.fetch_*`), so a trickling
origin cannot hold the per-model lock forever; a caller of `apply` that goes away cancels
the job (`abandon`) unless it already reached install, and status shows a job in flight
(`fetching`). A cut download keeps its partial file: the next apply resumes it.

State that must survive restarts (highest trusted version, versions that failed,
probation) lives in `state.json` beside the partials.

A manifest may offer its version to a share of the fleet only (`rollout`): a daemon outside
that share's cohort (`cohort`, hashed from its `identity`) treats the version as not
available yet; that is not an error, and nothing is reported upstream.

Modules: `check` (steps 1-2), `download` (3-4), `install` (the whole sequence, 5),
`probation` (6), `state` (on disk and in flight), `context` (what the steps share),
`cohort` and `identity` (staged rollout); this one holds the per-model lock, the poll loop
and the public surface.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from sidecar.domain.errors import FailedPrecondition, SidecarError
from sidecar.domain.progress import Progress, ignore
from sidecar.domain.updates import Check, Outcome, Rollout
from sidecar.engine.local import PoolEngine
from sidecar.metrics import Metrics
from sidecar.update import adapter_update, cohort
from sidecar.update import check as checking
from sidecar.update.context import UpdateContext
from sidecar.update.identity import Identity
from sidecar.update.install import apply_update
from sidecar.update.probation import Probation
from sidecar.update.state import Job

log = logging.getLogger("sidecar.update")


class Updater:
    def __init__(
        self, engine: PoolEngine, metrics: Metrics, probe_errors: dict[str, str | None]
    ) -> None:
        self.engine = engine
        self._ctx = UpdateContext(engine, metrics)
        self._probation = Probation(self._ctx, probe_errors)
        self._locks: dict[str, asyncio.Lock] = {}
        self.last = self._ctx.last  # per model, for status

    async def start(self) -> None:
        """Read, once, what status reports and this daemon's identity (off the loop)."""
        await asyncio.to_thread(self._ctx.load)

    async def check(self, model: str, ignore_rollout: bool = False) -> Check:
        """What `model`'s origin offers and what fetching it would cost; changes nothing."""
        if ":" in model:  # MODEL:ADAPTER
            return (
                await adapter_update.check(self._ctx, model, ignore_rollout=ignore_rollout)
            ).check
        return (await checking.check(self._ctx, model, ignore_rollout=ignore_rollout)).check

    async def apply(
        self,
        model: str,
        progress: Progress = ignore,
        owner: object = None,
        ignore_rollout: bool = False,
    ) -> Outcome:
        """Update `model` to what its origin offers, reporting on `progress`. `owner`: whoever
        asked (only they may `abandon` it). `ignore_rollout`: even outside the version's
        rollout cohort (an operator's manual canary; the poll loop never sets it)."""
        base, colon, adapter = model.partition(":")
        name = self.engine.pool(base).config.name + colon + adapter
        lock = self._locks.setdefault(name, asyncio.Lock())
        jobs = self._ctx.jobs
        if lock.locked():
            job = jobs.get(name)
            now = f" ({job.describe()})" if job is not None else ""
            raise FailedPrecondition(f"an update of {name!r} is already running{now}")
        async with lock:
            jobs[name] = Job(owner)
            try:
                if adapter:
                    return await adapter_update.apply(
                        self._ctx, self._probation, name, progress, ignore_rollout
                    )
                return await apply_update(
                    self._ctx, self._probation, name, progress, ignore_rollout
                )
            finally:
                jobs.pop(name, None)

    def identity(self) -> Identity | None:
        """This daemon's identity in the fleet, as the rollout hash reads it (None until the
        start has resolved it)."""
        return self._ctx.identity()

    def rollout(self, model: str) -> Rollout | None:
        """Where this daemon stands in the rollout of the last manifest `model`'s origin
        offered (None: no manifest read yet, or no update origin now). Computed with the
        identity as it is now; reads no file (status and scrapes call it on the loop)."""
        try:
            self._ctx.model(model)  # a reload may have removed the origin since
            offered = self._ctx.offered.get(model)
            me = self._ctx.identity()
            if offered is None or me is None:
                return None
            return cohort.rollout(me.value, model, offered.version, offered.fraction)
        except SidecarError:
            return None
        except Exception:  # a bug here must not take the whole status or scrape with it
            log.exception("update %s: cannot tell its rollout", model)
            return None

    def rollouts(self) -> dict[str, Rollout]:
        """`rollout` of every model that has one (for metrics)."""
        found = {name: self.rollout(name) for name in self.engine.pools}
        return {name: r for name, r in found.items() if r is not None}

    def last_rollback(self, model: str) -> str:
        """The last version probation swapped back, when and why ("" = none)."""
        return self._ctx.last_rollback.get(model, "")

    def fetching(self, model: str) -> str:
        """The update in flight for status ('' when none): bytes, age, deadline."""
        job = self._ctx.jobs.get(model)
        return job.describe() if job is not None else ""

    def abandon(self, model: str, owner: object, why: str = "the caller went away") -> bool:
        """Stop the update `owner` started on `model` because nobody waits for it, unless
        it already reached install. Its partial files stay for the next apply."""
        try:
            name = self.engine.pool(model).config.name
        except SidecarError:
            return False
        job = self._ctx.jobs.get(name)
        if job is None or job.owner is not owner or not job.cancellable:
            return False
        log.info("update %s: cancelled while %s (%s)", name, job.stage, why)
        job.control.cancel("cancelled", f"cancelled while {job.stage}: {why}")
        return True

    def _updated(self, name: str) -> bool:
        return self._ctx.state(name).installed_version > 0

    async def watch(self) -> None:
        """One probation pass over every model."""
        await self._probation.watch()

    async def run(self, stop: asyncio.Event, tick: float = 1.0) -> None:
        """Probation watch every tick; automatic checks every update.interval_seconds; an
        install that a crash interrupted is resumed at once."""
        next_check: dict[str, float] = {}
        for name in self.engine.pools:
            if self._ctx.state(name).pending:
                next_check[name] = 0.0
        while not stop.is_set():
            try:
                await self.watch()
            except Exception:  # a bug here must not end the loop, nor pass unseen
                log.exception("update probation check failed")
            now = time.monotonic()
            interval = self.engine.config.update.interval_seconds
            for base in self.engine.pools:
                m = self.engine.config.model(base)
                if m is None or not m.update_origin or not m.update_key:
                    continue
                # An adapter that came by an update is polled like its model (one that
                # was only added is not: its origin may not publish it).
                adapters = [f"{base}:{a}" for a in self.engine.adapters.names(base)]
                for name in (base, *adapters):
                    due = next_check.setdefault(name, now + interval if interval else float("inf"))
                    if now < due:
                        continue
                    next_check[name] = now + interval if interval else float("inf")
                    if name != base and not await asyncio.to_thread(self._updated, name):
                        continue
                    try:
                        await self.apply(name)
                    except SidecarError as e:
                        log.warning("update %s: %s", name, e.message)
                    except Exception:
                        log.exception("update %s failed", name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), tick)
