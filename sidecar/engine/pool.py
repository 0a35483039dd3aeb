"""ModelPool: the workers of one model, its fair queue, and the dispatch between them.

Everything here runs on the event loop; slots do the blocking work elsewhere and
report back through the `Events` callbacks. Each worker takes up to `capacity` jobs
(its batch's sequence slots); the fair queue decides who gets the next free one, and
the least loaded worker takes it. A worker that dies is replaced; the jobs it was
running fail at once and are never retried. A death one request explains (a crash
signal, or a hang the supervisor killed, while it was the only request of a caller
on that worker) fails it with `KilledWorker` and remembers it (see `poison`); when
several requests shared the batch nobody can tell which one it was, so, as for any
other death, they all fail with UNAVAILABLE (retry). When the replacement starts is
the restart policy's call (`restarts`).

The swap sequence (`swap`) drives a pool through its public methods only: `start_slot`,
`run_on` (the canary), `route_to` (the flip), `drain`, `pause`/`resume` and `workers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sidecar.config import ModelConfig
from sidecar.domain.errors import (
    FailedPrecondition,
    InternalError,
    KilledWorker,
    Overloaded,
    SidecarError,
    Unavailable,
    WorkerCrashed,
)
from sidecar.domain.lanes import LOW_PRIORITY, LowPriority
from sidecar.domain.specs import ADAPTERS_PER_WORKER, ModelFacts, RunnerSpec
from sidecar.domain.status import PoolStatus, SlotInfo
from sidecar.domain.types import GenerateTask, ModelRef, Result, Task, TokenEvent
from sidecar.engine.fair_queue import FairQueue
from sidecar.engine.latency import VERSIONS, Latencies
from sidecar.engine.poison import Poison, crashed, how
from sidecar.engine.residency import LOADED, UNLOADED, UNLOADING, Resident, idle_s, unload_in
from sidecar.engine.restarts import RestartPolicy
from sidecar.engine.slots import Slot, SlotFactory

log = logging.getLogger("sidecar.pool")

VERSION_CHARS = 12
EXPIRE_EVERY_S = 0.1  # how often a paused pool fails requests that waited too long
HOLD_MAX_S = 5.0  # longest a worker running background work is held at a stretch...
HOLD_GAP_S = 0.5  # ...before it runs this long (under unbroken live load it still finishes)
PROBE_CALLER = "sidecar:probe"
GATE_CALLER = "sidecar:eval-gate"  # the eval gate scoring the serving version (see `gate`)
OWN_CALLERS = (PROBE_CALLER, GATE_CALLER)  # the daemon's own requests: not live traffic

Event = TokenEvent | Result | SidecarError
_job_ids = itertools.count(1)


@dataclass
class Job:
    task: Task
    caller: str
    stream: bool
    background: bool = False  # runs only when no live request waits
    low: LowPriority | None = None  # a caller's low-priority request (not build work)
    id: int = field(default_factory=lambda: next(_job_ids))
    enqueued: float = field(default_factory=time.perf_counter)
    dispatched: float | None = None
    first_event: float | None = None
    slot: Slot | None = None
    ref: ModelRef | None = None  # the version that ran it, fixed at dispatch
    done: bool = False
    cancelled: bool = False  # asked to stop while running: its worker must run to say so
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    on_end: Callable[[], None] = lambda: None  # once, when its outcome is known (or cancelled)


class ModelPool:
    def __init__(
        self,
        config: ModelConfig,
        make_slot: SlotFactory,
        default_max_tokens: int,
        restart_policy: RestartPolicy | None = None,
    ) -> None:
        self.config = config
        self.spec = RunnerSpec(
            path=config.path,
            context=config.context,
            threads=config.threads,
            batch=config.batch,
            default_max_tokens=default_max_tokens,
            parallel=config.parallel,
            kv_cache=config.kv_cache,
        )
        self._make_slot = make_slot
        self._slots: list[Slot] = []
        self._queue: FairQueue[Job] = FairQueue(config.max_queue)
        self._running: dict[int, Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._retiring: set[Slot] = set()
        self._closing = False
        self.ref = ModelRef(config.name, "")
        self.facts: ModelFacts | None = None
        self.detail = "starting"
        self.restarts = 0
        self.restart_policy = restart_policy or RestartPolicy()
        self.last_error = ""
        self.poison = Poison()
        self._hung: dict[Slot, float] = {}  # slots the supervisor killed -> seconds silent
        self._paused: asyncio.Task[None] | None = None  # expires waiting jobs while paused
        # Residency (see `residency`): the engine loads and unloads; a request that finds
        # the pool unloaded waits in the queue and calls `wake` (the engine's load).
        self.residency = LOADED
        self.last_used = time.monotonic()
        self.footprint = 0  # bytes it takes loaded (the engine's estimate)
        self.wake: Callable[[], None] = lambda: None
        self.latencies = Latencies()  # live requests' time on a worker, per version
        # The same for the requests that asked for an adapter, per adapter version (sha256):
        # probation after an adapter update. Room for a few versions of each cached adapter.
        self.adapter_latencies = Latencies(VERSIONS * ADAPTERS_PER_WORKER)
        # Live requests a worker failed with an adapter version's own kind of failure (it
        # could not be loaded or applied, or an internal error), per version (sha256):
        # probation after an adapter update. Count and the last reason.
        self.adapter_failures: dict[str, tuple[int, str]] = {}
        self._held: set[Slot] = set()  # workers stopped for live work
        self._stretch: dict[Slot, float] = {}  # held workers -> when their stretch began
        self._let_run: dict[Slot, float] = {}  # held too long: not held again until then
        self._hold_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ lifecycle

    def use_file(self, path: Path) -> None:
        """Serve `path` from the next start (the store decides which file that is)."""
        self.config = replace(self.config, path=path)
        self.spec = replace(self.spec, path=path)

    async def start(self, version: str) -> None:
        """Start the workers on the file `use_file` chose; `version` is its sha256."""
        if not self.config.path.is_file():
            raise FailedPrecondition(f"model {self.config.name!r}: no file at {self.config.path}")
        self.ref = ModelRef(self.config.name, version[:VERSION_CHARS])
        slots = [self._make_slot(self.spec, self) for _ in range(self.config.workers)]
        results = await asyncio.gather(*(s.start() for s in slots), return_exceptions=True)
        for slot, res in zip(slots, results, strict=True):
            if isinstance(res, BaseException):
                await slot.stop()
                continue
            self.facts = res
            self._slots.append(slot)
        if not self._slots:
            err = next(r for r in results if isinstance(r, BaseException))
            raise err if isinstance(err, SidecarError) else FailedPrecondition(str(err))
        self.detail = ""
        self.residency = LOADED
        log.info(
            "model %s@%s ready: %d worker(s), context %d",
            self.ref.name,
            self.ref.version,
            len(self._slots),
            self.config.context,
        )
        self._dispatch()  # what waited for an on-demand load

    async def unload(self) -> None:
        """Stop every worker (their memory goes back to the system); the file stays chosen
        for the next `start`. The engine calls it only with nothing in flight; a request
        that arrives meanwhile waits in the queue and wakes a load."""
        self.residency = UNLOADING
        slots = [*self._slots, *self._retiring]
        self._slots = []
        self._retiring.clear()
        self._hung.clear()
        await asyncio.gather(*(s.stop() for s in slots), return_exceptions=True)
        self.residency = UNLOADED
        self.detail = ""
        log.info("model %s@%s unloaded", self.ref.name, self.ref.version)
        if len(self._queue):  # arrived while the workers stopped
            self.wake()

    def fail_waiting(self, error: SidecarError) -> None:
        """A load failed: what waited for it fails with its reason."""
        self.last_error = error.message
        while (job := self._queue.pop()) is not None:
            self._finish(job, error)

    @property
    def in_flight(self) -> int:
        """Requests queued or running (the daemon's own probes included)."""
        return len(self._queue) + len(self._running)

    def resident(self, busy: bool = False) -> Resident:
        """This pool as the residency policy sees it."""
        return Resident(
            name=self.config.name,
            state=self.residency,
            on_demand=self.config.load == "on_demand",
            keep_alive_s=self.config.keep_alive,
            last_used=self.last_used,
            in_flight=self.in_flight,
            footprint=self.footprint,
            busy=busy,
        )

    async def close(self) -> None:
        self._closing = True
        if self._hold_timer is not None:
            self._hold_timer.cancel()
        for t in [*self._tasks, *([self._paused] if self._paused else [])]:
            t.cancel()
        while (job := self._queue.pop()) is not None:
            self._finish(job, Unavailable("the daemon is shutting down"))
        slots = [*self._slots, *self._retiring]
        await asyncio.gather(*(s.stop() for s in slots), return_exceptions=True)

    @property
    def ready(self) -> bool:
        return any(s.info.state in ("idle", "busy") for s in self._slots)

    @property
    def paused(self) -> bool:
        """New requests wait in the queue (a replace-strategy swap has no worker yet)."""
        return self._paused is not None

    # ------------------------------------------------------------------ jobs

    def submit(self, task: Task, caller: str, stream: bool, background: bool = False) -> Job:
        if self._closing:
            raise Unavailable("the daemon is shutting down")
        self.poison.check(task, caller, self.ref)
        if not self.ready and not self.paused and self.residency == LOADED:
            raise Unavailable(
                f"model {self.ref.name!r} has no live worker ({self.detail}); retry shortly"
            )
        low = LOW_PRIORITY.get() if background else None
        job = Job(task, caller, stream, background, low)
        self._queue.put(caller, job, background=background, request=low is not None)
        if caller != PROBE_CALLER:
            self.last_used = time.monotonic()
        if self.residency != LOADED:
            self.wake()  # the job waits in the queue for the load (its queue_ms shows it)
        self._dispatch()
        return job

    def cancel(self, job: Job) -> None:
        if job.done:
            return
        if job.slot is None:
            self._queue.remove(job)
            job.done = True
            job.on_end()
        else:
            job.cancelled = True
            job.slot.cancel(job.id)
            self._hold()

    def _free(self) -> Slot | None:
        """The serving worker with a free sequence slot that runs the fewest jobs, one
        without background jobs first."""
        free = [
            s
            for s in self._slots
            if s.info.state in ("idle", "busy") and len(s.job_ids) < s.capacity
        ]
        # Not beside background work where there is a choice: a worker that runs a live job
        # cannot be paused for it (see `_hold`).
        held = {j.slot for j in self._running.values() if j.background}
        return min(free, key=lambda s: (s in held, len(s.job_ids))) if free else None

    def _dispatch(self) -> None:
        self._dispatch_jobs()
        self._hold()

    def _dispatch_jobs(self) -> None:
        # Background work never holds every sequence slot of a pool that has more than one,
        # so a live request finds one free instead of waiting for a background job to end.
        total = sum(s.capacity for s in self._slots)
        room = max(1, total - 1) - sum(j.background for j in self._running.values())
        while len(self._queue) and not self.paused and (slot := self._free()) is not None:
            job = self._queue.pop(background=room > 0)
            if job is None:
                return
            try:  # copies queued before the first one killed a worker stop here
                self.poison.check(job.task, job.caller, self.ref)
            except KilledWorker as e:
                self._finish(job, e)
                continue
            room -= job.background
            job.slot = slot
            job.ref = self.ref
            job.dispatched = time.perf_counter()
            self._running[job.id] = job
            slot.submit(job.id, job.task, job.stream)
            if job.low is not None:
                job.low.on_dispatch()

    def _hold(self) -> None:
        """Background work gives its cores to live work. A serving worker that runs only
        background jobs is stopped (`Slot.suspend`) while a live job runs on another worker
        of the pool, and continues as soon as none does: a live request then runs as fast
        as with no background work at all, however far the background job had got, and
        the background job's reply is the one it would have had anyway. Held HOLD_MAX_S at
        a stretch, it runs HOLD_GAP_S before it may be held again. A worker still stopped
        when the daemon dies is not left behind: its process group is then orphaned, and the
        kernel sends a stopped member of such a group SIGHUP and SIGCONT."""
        now = time.monotonic()
        on: dict[Slot, list[Job]] = {}
        for j in self._running.values():
            if j.slot is not None:
                on.setdefault(j.slot, []).append(j)
        # Callers' live jobs only: the daemon's own (probes, canaries, a candidate's golden
        # rows) are not worth an eval's progress.
        live = any(
            not j.background and j.caller not in OWN_CALLERS and j.slot is not None
            for j in self._running.values()
        )
        if len(self._queue) > self._queue.background:
            live = False  # a live job waits for a worker: let background jobs end and free one
        self._let_run = {s: t for s, t in self._let_run.items() if t > now}
        wake: list[float] = []
        for slot in {*self._slots, *self._held, *self._stretch}:
            jobs = on.get(slot, [])
            only_background = (
                slot in self._slots
                and bool(jobs)
                and all(j.background and not j.cancelled for j in jobs)
            )
            if not only_background:
                self._stretch.pop(slot, None)
            want = live and only_background
            # A stretch runs from the first hold until a let-run, across the short gaps
            # between live jobs (back-to-back live jobs would otherwise restart it forever).
            start = self._stretch.get(slot)
            if want and start is not None and now - start >= HOLD_MAX_S:
                self._let_run[slot] = now + HOLD_GAP_S
                del self._stretch[slot]
            if want and slot in self._let_run:
                want = False
                wake.append(self._let_run[slot])
            if want:
                start = self._stretch.setdefault(slot, now)
                self._held.add(slot)
                slot.suspend(True)
                wake.append(start + HOLD_MAX_S)
            elif slot in self._held:
                self._held.discard(slot)
                slot.suspend(False)
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        if wake and not self._closing:
            loop = asyncio.get_running_loop()
            self._hold_timer = loop.call_later(max(0.0, min(wake) - now), self._hold)

    def fail_queued(self, error: Callable[[Job], SidecarError | None]) -> None:
        """Fail each queued job `error` gives an error for (what it fixed cannot run on
        the workers about to serve): it never reaches a worker, nor counts as a failure of
        its adapter version."""
        for job in list(self._queue.items()):
            problem = error(job)
            if problem is not None:
                self._queue.remove(job)
                self._finish(job, problem)

    def _finish(self, job: Job, event: Event) -> None:
        if not job.done:
            job.done = True
            job.events.put_nowait(event)
            job.on_end()

    # ------------------------------------------------------------------ Events (from slots)

    def token(self, slot: Slot, job_id: int, event: TokenEvent) -> None:
        job = self._running.get(job_id)
        if job is not None and not job.done:
            if job.first_event is None:
                job.first_event = time.perf_counter()
            job.events.put_nowait(event)

    def done(self, slot: Slot, job_id: int, result: Result) -> None:
        self._settle(slot, job_id, result)

    def failed(self, slot: Slot, job_id: int, error: SidecarError) -> None:
        self._settle(slot, job_id, error)

    def _settle(self, slot: Slot, job_id: int, event: Event) -> None:
        job = self._running.pop(job_id, None)
        if job is not None:
            if (
                job.ref is not None
                and job.dispatched is not None
                and job.caller not in OWN_CALLERS
                and not isinstance(event, SidecarError)
            ):
                ms = (time.perf_counter() - job.dispatched) * 1000
                self.latencies.add(job.ref.version, ms)
                lora = getattr(job.task, "lora", None)
                if lora is not None:
                    self.adapter_latencies.add(lora.sha256, ms)
            self._count_failure(job, event)
            self._finish(job, event)
            if job.caller != PROBE_CALLER:
                self.last_used = time.monotonic()  # idle counts from the end of the last one
        if slot.info.state == "idle" and slot in self._retiring and slot not in self._slots:
            self._background(self._stop_retired(slot))  # replaced while it finished its jobs
        self._dispatch()

    def _count_failure(self, job: Job, event: Event) -> None:
        lora = getattr(job.task, "lora", None)
        # The version's fault, not the caller's (a bad request, a schema the reply missed,
        # a cancellation) nor the pool's (a crash is a restart, which probation sees).
        own = type(event) in (FailedPrecondition, InternalError)
        if lora is None or job.caller in OWN_CALLERS or not own:
            return
        assert isinstance(event, SidecarError)
        count, _ = self.adapter_failures.get(lora.sha256, (0, ""))
        self.adapter_failures[lora.sha256] = (count + 1, event.message)
        while len(self.adapter_failures) > VERSIONS * ADAPTERS_PER_WORKER:
            del self.adapter_failures[next(iter(self.adapter_failures))]

    def died(self, slot: Slot, exitcode: int | None, job_ids: set[int]) -> None:
        silent = self._hung.pop(slot, None)
        pid = slot.info.pid
        if silent is not None:
            reason = f"worker pid {pid} answered no ping for {silent:.0f}s and was killed"
        else:
            reason = f"worker pid {pid} exited ({how(exitcode)})"
        jobs = [j for i in sorted(job_ids) if (j := self._running.pop(i, None)) is not None]
        # Probes and canaries are the daemon's own one-token requests: they never kill. Of
        # several requests in one batch, none can be told to be the one that did.
        suspects = [j for j in jobs if j.caller != PROBE_CALLER]
        culprit = suspects[0] if len(suspects) == 1 else None
        blamed = culprit is not None and (silent is not None or crashed(exitcode))
        for job in jobs:
            error: SidecarError
            if blamed and job is culprit:
                name = (job.ref or self.ref).name
                what = (
                    f"stalled a worker of model {name!r} (pid {pid} answered no ping for "
                    f"{silent:.0f}s, server.hang_seconds, and was killed)"
                    if silent is not None
                    else f"crashed a worker of model {name!r} (pid {pid}, {how(exitcode)})"
                )
                error = self.poison.blame(
                    job.task, job.caller, job.ref or self.ref, what, strike=silent is None
                )
                log.warning(
                    "model %s: a %s request from %s %s", name, job.task.kind, job.caller, what
                )
            else:
                error = WorkerCrashed(f"{reason} during the request: retry")
            self._finish(job, error)
        if jobs and not blamed and len(suspects) > 1 and crashed(exitcode):
            log.warning(
                "model %s: a worker crashed running %d requests at once; none is blamed",
                self.ref.name,
                len(suspects),
            )
        self._hold()
        if slot not in self._slots:
            # A canary worker that never served, or an old one already replaced: the
            # swap or retirement that owned it handles the failure; nothing to restart.
            self._retiring.discard(slot)
            return
        self.detail = self.last_error = reason
        delay = self.restart_policy.after_death(time.monotonic(), slot.started_at, blamed)
        log.warning(
            "model %s: %s; restarting it %s",
            self.ref.name,
            reason,
            f"in {delay:.1f}s" if delay else "now",
        )
        if not self._closing:
            self._background(self._respawn(slot, delay))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` beside the request path, kept referenced (and cancelled on close)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _respawn(self, dead: Slot, delay: float) -> None:
        """Put a fresh worker where `dead` served, after `delay`, trying until one starts."""
        while not self._closing:
            await asyncio.sleep(delay)
            try:
                fresh = await self.start_slot(self.spec)
            except Exception as e:
                delay = self.restart_policy.after_failed_start(delay)
                self.detail = self.last_error = f"worker restart failed: {e}"
                log.warning("model %s: %s; next try in %.1fs", self.ref.name, self.detail, delay)
                continue
            if self._closing or dead not in self._slots:  # unloaded meanwhile
                await fresh.stop()
                return
            self._slots[self._slots.index(dead)] = fresh
            self.restarts += 1
            if self.ready:
                self.detail = ""
            self._dispatch()
            return

    # ------------------------------------------------------------------ supervision

    def reconfigure(self, config: ModelConfig) -> None:
        """Take the settings that can change live (queue bound, RSS ceiling)."""
        self.config = config
        self._queue.limit = config.max_queue

    def supervise(self, now: float, hang_s: float) -> None:
        """One supervisor tick: kill hung workers, ping the rest, retire bloated idle ones."""
        ceiling = self.config.max_rss_mb * 1024 * 1024
        for slot in list(self._slots):
            if slot.info.state not in ("idle", "busy"):
                continue
            silent = slot.unanswered_s(now)
            if silent > hang_s:
                log.warning(
                    "model %s: worker pid %s did not answer a ping for %.0fs; killing it",
                    self.ref.name,
                    slot.info.pid,
                    silent,
                )
                self._hung[slot] = silent  # its death is then blamed on what it ran
                slot.kill()
                continue
            slot.ping()
            if ceiling and slot.info.state == "idle" and (slot.rss() or 0) > ceiling:
                self._retire(slot, f"worker pid {slot.info.pid} is over max_rss_mb")

    def _retire(self, slot: Slot, reason: str) -> None:
        """Replace a healthy but unwanted worker: the new one first, then the old one
        leaves once it is idle, so nothing waits and nothing running is cut off."""
        if slot in self._retiring:
            return
        log.info("model %s: %s; replacing it", self.ref.name, reason)
        self._retiring.add(slot)
        self.last_error = reason

        async def succeed() -> None:
            try:
                fresh = await self.start_slot(self.spec)
            except Exception as e:
                self._retiring.discard(slot)
                log.warning("model %s: replacement worker failed to start: %s", self.ref.name, e)
                return
            if self._closing or slot not in self._slots:
                await fresh.stop()
                return
            self._slots[self._slots.index(slot)] = fresh
            self.restarts += 1
            if not slot.job_ids:
                await self._stop_retired(slot)
            self._dispatch()

        self._background(succeed())

    async def _stop_retired(self, slot: Slot) -> None:
        self._retiring.discard(slot)
        await slot.stop()

    # ------------------------------------------------------------------ what a swap drives

    async def start_slot(self, spec: RunnerSpec) -> Slot:
        """A new worker on `spec`, started and reporting its facts, serving nothing yet
        (see `route_to`). A worker that fails to start is stopped and its error raised."""
        slot = self._make_slot(spec, self)
        try:
            await slot.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await slot.stop()
            raise
        return slot

    async def run_on(self, slot: Slot, task: Task) -> Event:
        """Run one job on a specific slot outside the queue (canaries on unflipped workers)."""
        job = Job(task, PROBE_CALLER, stream=False)
        job.slot = slot
        self._running[job.id] = job
        slot.submit(job.id, task, False)
        return await job.events.get()

    def workers(self) -> list[Slot]:
        """Every worker that may still map a model file: serving, and replaced but not
        yet stopped (draining, or retiring once idle)."""
        return [*self._slots, *self._retiring]

    def route_to(self, slots: list[Slot], ref: ModelRef, spec: RunnerSpec) -> list[Slot]:
        """The flip: new requests go to `slots` (serving `ref`, started on `spec`) from now
        on; the workers that served until now finish what they run and are returned, to be
        drained. With no slots, new requests wait (see `pause`)."""
        old = self._slots
        self._slots = list(slots)
        if slots:  # a swap of an unloaded model leaves the proven new one loaded
            self.residency = LOADED
            self.last_used = time.monotonic()
        self.ref, self.spec = ref, spec
        self.facts = slots[0].facts if slots else self.facts
        for s in old:
            self._retiring.add(s)
        self._dispatch()
        return old

    async def drain(self, old: list[Slot], timeout_s: float) -> None:
        """Wait (bounded) for old workers to finish their jobs, then stop them."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while any(s.info.state == "busy" for s in old) and loop.time() < deadline:  # noqa: ASYNC110 - bounded; slots report on the loop, not through an event
            await asyncio.sleep(0.05)
        await asyncio.gather(*(self._stop_retired(s) for s in old), return_exceptions=True)

    def pause(self, wait_s: float) -> None:
        """Hold new requests in the queue instead of refusing them while no worker serves;
        one that waits longer than `wait_s` fails with retry advice."""
        if self._paused is None:
            self._paused = asyncio.get_running_loop().create_task(self._expire(wait_s))

    def resume(self) -> None:
        """Undo `pause`: what waited goes to the workers now serving."""
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        self._dispatch()

    async def _expire(self, wait_s: float) -> None:
        while True:
            now = time.perf_counter()
            for job in [j for j in self._queue.items() if now - j.enqueued > wait_s]:
                self._queue.remove(job)
                self._finish(
                    job,
                    Unavailable(
                        f"model {self.ref.name!r} is being replaced; retry in a few seconds"
                    ),
                )
            await asyncio.sleep(EXPIRE_EVERY_S)

    async def probe(self) -> str | None:
        """A one-token generation through the queue: None if it answered, else why not.
        A model that is not loaded is not loaded for a probe: nothing to prove."""
        if self.residency != LOADED:
            return None
        try:
            job = self.submit(GenerateTask("Hello", 1), PROBE_CALLER, stream=False)
        except Overloaded:
            return None  # busy is alive
        except SidecarError as e:
            return e.message
        event = await job.events.get()
        return event.message if isinstance(event, SidecarError) else None

    # ------------------------------------------------------------------ status

    def status(self, last_swap: str = "") -> PoolStatus:
        """What `sidecar status` shows; `last_swap` is the swap sequence's own record."""
        now, resident = time.monotonic(), self.resident()
        return PoolStatus(
            model=self.ref,
            path=self.spec.path,  # what the workers serve now, swaps included
            context=self.config.context,
            threads=self.config.threads,
            workers=tuple(SlotInfo(s.info.pid, s.info.state, s.info.requests) for s in self._slots),
            queue_depth=len(self._queue),
            queue_limit=self._queue.limit,
            ready=self.ready or self.residency != LOADED,  # an unloaded one loads on use
            detail=self.detail,
            restarts=self.restarts,
            backoff_s=self.restart_policy.backoff_s,
            last_error=self.last_error,
            last_swap=last_swap,
            rss=tuple(s.rss() for s in self._slots),
            state=self.residency,
            on_demand=resident.on_demand,
            in_flight=resident.in_flight,
            idle_s=idle_s(resident, now),
            unload_in_s=unload_in(resident, now),
            footprint=self.footprint,
        )
