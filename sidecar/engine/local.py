"""The local engine: the named models of this machine, each run by a pool of workers.

`PoolEngine` implements the `Engine` seam (sidecar.domain.seam) over one `ModelPool` per
named model; what a pool runs jobs on is a slot kind: "process" (spawned workers, the
default), "thread" (in-process, for debugging) or "fake" (no llama.cpp, for fast service
tests). Scheduling, validation, timings and model resolution are the same code for all
three. Swaps are the `Swapper`'s (engine/swap.py); the engine only names the pool.

Residency (load on demand, keep-alive, the memory budget) is decided by `residency` and
applied here: one load, unload or swap of a model at a time (a per-model lock), and one
decision about room in the budget at a time (so two loads never both count on the same
free memory). A swap of an unloaded model proves the new file on new workers, as any
swap does, and leaves it loaded; keep_alive then unloads it like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from sidecar.config import Config
from sidecar.domain.errors import (
    FailedPrecondition,
    InternalError,
    ModelNotFound,
    Overloaded,
    SidecarError,
    SwapRefused,
    Unavailable,
)
from sidecar.domain.names import shown
from sidecar.domain.progress import Progress, ignore
from sidecar.domain.seam import DEFAULT_ROUTE
from sidecar.domain.status import PoolStatus, SwapResult
from sidecar.domain.types import (
    AdapterFile,
    Classification,
    Embeddings,
    EmbedTask,
    Extraction,
    Generation,
    ModelRef,
    Result,
    RouteRequest,
    StreamableTask,
    Task,
    Timings,
    TokenEvent,
)
from sidecar.engine import residency
from sidecar.engine.adapters import AdapterTable
from sidecar.engine.fake import FakeSlot
from sidecar.engine.pool import VERSION_CHARS, Job, ModelPool
from sidecar.engine.slots import ProcessSlot, SlotFactory, ThreadSlot
from sidecar.engine.swap import Swapper, footprint
from sidecar.store import ModelStore, startup_blob
from sidecar.validate import Limits, check

log = logging.getLogger("sidecar.residency")

SLOT_KINDS: dict[str, SlotFactory] = {
    "process": ProcessSlot,
    "thread": ThreadSlot,
    "fake": FakeSlot,
}


class PoolEngine:
    def __init__(
        self,
        config: Config,
        slot_kind: str = "process",
        make_slot: SlotFactory | None = None,
        store: ModelStore | None = None,
    ) -> None:
        self.config = config
        self.store = store or ModelStore(config.store.path)
        factory = make_slot or SLOT_KINDS[slot_kind]
        if factory in (ProcessSlot, ThreadSlot):  # sealed blobs are mapped from memory
            factory = functools.partial(
                factory, model_fd=self.store.worker_fd, adapter_fd=self.store.adapter_fd
            )
        self.pools = {
            m.name: ModelPool(m, factory, config.server.default_max_tokens) for m in config.models
        }
        self.default_model = config.default_model
        self.adapters = AdapterTable(self.store, lambda: self.config.tasks, config.default_model)
        self.adapters.changed = self._recount
        self.shed_reason: str | None = None  # set by the supervisor under memory pressure
        self.on_result: Callable[[Result], None] = lambda _r: None  # metrics hook
        # metrics hook: (model, outcome "swapped" | "unchanged" | "refused", refusing stage)
        self.on_swap: Callable[[str, str, str], None] = lambda _m, _o, _s: None
        self.swapper = Swapper(
            self.pools,
            self.store,
            lambda: self.config.store,
            lambda: self.config.tasks,
            self.adapters,
        )
        self._locks = {name: asyncio.Lock() for name in self.pools}  # load/unload/swap
        self._room = asyncio.Lock()  # one budget decision at a time
        self._loads: dict[str, asyncio.Task[None]] = {}
        self._unloads: set[asyncio.Task[None]] = set()
        for name, pool in self.pools.items():
            pool.wake = lambda name=name: self._wake(name)  # type: ignore[misc]

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self.adapters.refresh)
            for name, pool in self.pools.items():
                blob = await asyncio.to_thread(startup_blob, self.store, name, pool.config.path)
                pool.use_file(blob)
                # The store's active model may have been swapped to a file of other
                # dimensions before a restart: its adapters are checked as a swap does.
                misfits = await asyncio.to_thread(self.adapters.misfits, name, blob)
                self.adapters.mark(name, misfits, blob.stem[:VERSION_CHARS])
                pool.footprint = await asyncio.to_thread(self._footprint, pool)
                if pool.config.load == "on_demand":
                    pool.residency = residency.UNLOADED
                    pool.ref = ModelRef(name, blob.stem[:VERSION_CHARS])
            now_ = [p for p in self.pools.values() if p.residency == residency.LOADED]
            await asyncio.gather(*(p.start(p.config.path.stem) for p in now_))
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        for t in [*self._loads.values(), *self._unloads]:
            t.cancel()
        await asyncio.gather(*(p.close() for p in self.pools.values()), return_exceptions=True)

    @property
    def ready(self) -> bool:
        """Every model that is loaded has a live worker; an on-demand model that is not
        loaded counts as ready (a request loads it)."""
        return bool(self.pools) and all(
            p.ready or p.residency != residency.LOADED for p in self.pools.values()
        )

    # ------------------------------------------------------------------ residency

    def _footprint(self, pool: ModelPool) -> int:
        """Bytes `pool` takes loaded: weights plus KV cache per worker (`swap.footprint`),
        plus the adapters its workers may hold; the file size when the header cannot be
        read (the load will say why)."""
        spec = pool.spec
        path = spec.path
        loras = self.adapters.loaded_bytes(pool.config.name, pool.config.workers)
        try:
            info = self.store.gguf(path)
            return footprint(info, spec.kv_cells, pool.config.workers, spec.kv_cache) + loras
        except (SidecarError, OSError):
            return (path.stat().st_size if path.is_file() else 0) + loras

    def _recount(self, model: str) -> None:
        """An adapter of `model` was activated: its footprint counts it from now on."""
        pool = self.pools[model]
        pool.footprint = self._footprint(pool)

    def _verify(self, pool: ModelPool) -> None:
        """Before a stored file is loaded again: still the bytes it was stored as (one stat,
        unless it was touched; see `ModelStore.verify`)? A changed one is set aside."""
        path = pool.spec.path
        if path.parent != self.store.blobs:
            return
        try:
            self.store.verify(path.stem)
        except ModelNotFound:
            raise FailedPrecondition(f"model {pool.config.name!r}: no file at {path}") from None

    def _wake(self, name: str) -> None:
        """A request found `name` unloaded: load it (once), failing what waits if it cannot."""
        running = self._loads.get(name)
        if running is None or running.done():
            self._loads[name] = asyncio.get_running_loop().create_task(self._load_waiting(name))

    async def _load_waiting(self, name: str) -> None:
        pool = self.pools[name]
        try:
            await self._load(name)
        except SidecarError as e:
            log.warning("model %s: on-demand load failed: %s", name, e.message)
            pool.fail_waiting(e)
        except Exception as e:
            log.exception("model %s: on-demand load failed", name)
            pool.fail_waiting(Unavailable(f"model {name!r} could not be loaded: {e}"))

    def residents(self) -> list[residency.Resident]:
        return [p.resident(self._locks[n].locked()) for n, p in self.pools.items()]

    async def load(self, model: str) -> bool:
        """Load `model` ("" = the default) unless it is; False if it already was. Makes room
        in the memory budget first. Raises what the load or the budget refused. A caller
        that goes away (a deadline, Ctrl-C) does not stop the load half way: workers already
        spawned would be left running outside the pool's count."""
        return await _outliving(self._load(model))

    async def _load(self, model: str) -> bool:
        pool = self.pool(model)
        name = pool.config.name
        async with self._locks[name]:
            if pool.residency == residency.LOADED:
                return False
            pool.residency = residency.LOADING
            started = time.monotonic()
            try:
                async with self._room:
                    pool.footprint = await asyncio.to_thread(self._footprint, pool)
                    # One victim at a time, from a fresh snapshot each time: while one
                    # unloads, another may start loading or unloading (its lock taken).
                    # Waiting for that lock while holding `_room` could deadlock with its
                    # own load waiting for `_room`; the next snapshot sees it busy instead.
                    while victims := residency.make_room(
                        self.residents(),
                        name,
                        pool.footprint,
                        self.config.server.max_model_memory_mb,
                    ):
                        victim = victims[0]
                        if self._locks[victim].locked():
                            continue
                        log.info(
                            "model %s: unloading idle %s to fit server.max_model_memory_mb",
                            name,
                            victim,
                        )
                        await self._unload_now(self.pools[victim])
                await asyncio.to_thread(self._verify, pool)
                pool.use_file(pool.spec.path)
                await pool.start(pool.spec.path.stem)
            except BaseException:
                pool.residency = residency.UNLOADED
                raise
            log.info("model %s loaded on demand in %.2fs", name, time.monotonic() - started)
            return True

    async def _unload_now(self, pool: ModelPool) -> None:
        """Unload an idle `pool` under its own lock (free: the caller checked, with no await
        between, so taking it does not wait)."""
        async with self._locks[pool.config.name]:
            if pool.residency == residency.LOADED and not pool.in_flight:
                await pool.unload()

    async def unload(self, model: str) -> bool:
        """Unload `model` ("" = the default): its workers stop and their memory returns to
        the system; the next request loads it again. False if it was not loaded. Refused
        (FailedPrecondition) while requests are in flight. Like a load, it runs to its end
        even if its caller goes away (a half-stopped model would stay "unloading")."""
        return await _outliving(self._unload(model))

    async def _unload(self, model: str) -> bool:
        pool = self.pool(model)
        async with self._locks[pool.config.name]:
            if pool.residency != residency.LOADED:
                return False
            if pool.in_flight:
                raise FailedPrecondition(
                    f"model {pool.config.name!r} has {pool.in_flight} request(s) in flight: "
                    "unload it once they finish"
                )
            await pool.unload()
            return True

    def unload_idle(self, now: float) -> list[str]:
        """The supervisor's tick: unload (in the background) the on-demand models idle past
        their keep_alive; the names it started on."""
        self.keep_images()  # the supervisor's tick: what unloads and swaps left behind
        due = residency.expired(self.residents(), now)
        for name in due:
            log.info("model %s idle for %.0fs: unloading", name, self.pools[name].config.keep_alive)
            task = asyncio.get_running_loop().create_task(self._unload_idle(name))
            self._unloads.add(task)
            task.add_done_callback(self._unloads.discard)
        return due

    async def _unload_idle(self, name: str) -> None:
        with contextlib.suppress(FailedPrecondition):  # a request came in meanwhile: stay
            await self.unload(name)

    def pool(self, model: str) -> ModelPool:
        name = model or self.default_model
        pool = self.pools.get(name)
        if pool is None:
            known = ", ".join(sorted(self.pools)) or "none"
            raise ModelNotFound(f"no model named {shown(name)} is loaded (loaded: {known})")
        return pool

    def ref(self, model: str) -> ModelRef:
        return self.pool(model).ref

    def check(self, model: str, task: Task) -> None:
        """Refuse bad input against `model`'s limits, wherever the task will run: a request
        bound for the cloud is bounded exactly like one for a worker."""
        pool = self.pool(model)
        s = self.config.server
        check(task, Limits(pool.config.context, s.max_labels, s.max_embed_texts))
        if not isinstance(task, EmbedTask):
            self.adapters.of(pool.config.name, task)  # NOT_FOUND before anything runs

    def adapter_ref(self, model: str, adapter: str) -> ModelRef:
        file = self.adapters.resolve(self.pool(model).config.name, adapter)
        return ModelRef(file.name, file.sha256[:VERSION_CHARS])

    def _with_adapter(self, pool: ModelPool, task: Task) -> tuple[Task, AdapterFile | None]:
        """`task` with the adapter version it will run with fixed, and that version held in
        the store until the job ends (no gc or remove takes it from under the job)."""
        if isinstance(task, EmbedTask) or not task.adapter:
            return task, None
        file = task.lora or self.adapters.resolve(pool.config.name, task.adapter)
        self.store.hold(file.sha256)
        return replace(task, lora=file), file

    def _submit(
        self, model: str, task: Task, caller: str, stream: bool, background: bool = False
    ) -> tuple[ModelPool, Job]:
        pool = self.pool(model)
        if self.shed_reason:
            raise Overloaded(self.shed_reason)
        self.check(model, task)
        task, held = self._with_adapter(pool, task)
        try:
            job = pool.submit(task, caller, stream, background)
        except BaseException:
            if held is not None:
                self.store.release(held.sha256)
            raise
        if held is not None:
            sha = held.sha256
            job.on_end = lambda: self.store.release(sha)
        return pool, job

    async def run(
        self,
        model: str,
        task: Task,
        caller: str,
        *,
        route: RouteRequest = DEFAULT_ROUTE,
        background: bool = False,
    ) -> Result:
        """Run `task`; `background` work waits until no live request does (few-shot builds).
        `route` is the router's business: everything here runs locally."""
        pool, job = self._submit(model, task, caller, stream=False, background=background)
        try:
            event = await job.events.get()
        except asyncio.CancelledError:
            pool.cancel(job)
            raise
        if isinstance(event, SidecarError):
            raise event
        if isinstance(event, TokenEvent):  # pragma: no cover - unary jobs never stream
            raise InternalError("a unary job streamed tokens")
        result = _stamp(event, pool, job)
        self.on_result(result)
        return result

    async def stream(
        self,
        model: str,
        task: StreamableTask,
        caller: str,
        *,
        route: RouteRequest = DEFAULT_ROUTE,
    ) -> AsyncGenerator[TokenEvent | Generation, None]:
        pool, job = self._submit(model, task, caller, stream=True)
        try:
            while True:
                event = await job.events.get()
                if isinstance(event, TokenEvent):
                    yield event
                    continue
                if isinstance(event, SidecarError):
                    raise event
                if not isinstance(event, Generation):  # pragma: no cover
                    raise InternalError("a stream ended without a generation")
                result = _stamp(event, pool, job)
                self.on_result(result)
                yield result
                return
        finally:
            # Reached on client cancellation and deadline too: free the worker.
            pool.cancel(job)

    async def swap(
        self,
        name: str,
        *,
        version: str = "",
        path: Path | None = None,
        strategy: str = "",
        progress: Progress = ignore,
        move_source: bool = False,
        gate: bool = True,
    ) -> SwapResult:
        """Swap `name` to a stored version or a new file (see `Swapper.swap`)."""
        pool = self.pool(name)
        # Not beside a load or unload of it; a second swap is refused by the swapper at once.
        try:
            async with contextlib.AsyncExitStack() as held:
                if not self.swapper.busy(pool.config.name):
                    await held.enter_async_context(self._locks[pool.config.name])
                result = await self.swapper.swap(
                    pool,
                    version=version,
                    path=path,
                    strategy=strategy,
                    progress=progress,
                    move_source=move_source,
                    gate=gate,
                )
        except SwapRefused as e:
            self.on_swap(pool.config.name, "refused", e.stage)
            raise
        if result.new != result.old:  # the budget counts the new file's size from now on
            pool.footprint = await asyncio.to_thread(self._footprint, pool)
        self.keep_images()
        outcome = "unchanged" if result.new == result.old else "swapped"
        self.on_swap(pool.config.name, outcome, "")
        return result

    def keep_images(self) -> None:
        """Close the decrypted copies (memfds) no pool needs to start a worker from: what a
        loaded or loading pool serves, what a live worker runs, what a swap holds."""
        needed = self.store.held()
        for pool in self.pools.values():
            if pool.residency != residency.UNLOADED:
                needed.add(pool.spec.path.stem)
            needed.update(
                s.spec.path.stem for s in pool.workers() if s.info.state not in ("dead", "stopped")
            )
            if pool.residency != residency.UNLOADED:  # its workers may load them any time
                needed.update(self.adapters.shas(pool.config.name))
        self.store.images.keep(needed)

    def in_use(self) -> dict[str, str]:
        """sha256 of every store blob a live worker maps -> which worker (see `Swapper`)."""
        return self.swapper.in_use()

    def status(self) -> list[tuple[PoolStatus, bool]]:
        return [
            (
                replace(
                    p.status(self.swapper.last_swap(name)),
                    adapters=tuple(self.adapters.names(name)),
                ),
                name == self.default_model,
            )
            for name, p in self.pools.items()
        ]


R = TypeVar("R", bound=Generation | Classification | Extraction | Embeddings)
T = TypeVar("T")


def _stamp(result: R, pool: ModelPool, job: Job) -> R:
    """Fill in who answered and the daemon-side timings."""
    now = time.perf_counter()
    queue_ms = ((job.dispatched or now) - job.enqueued) * 1000
    total_ms = (now - job.enqueued) * 1000
    if job.first_event is not None:  # streamed: when the first piece reached the daemon
        first_ms = (job.first_event - job.enqueued) * 1000
    elif result.timings.first_token_ms:  # unary: the worker timed its own first token
        first_ms = queue_ms + result.timings.first_token_ms
    else:  # no tokens (classify, embed): the whole answer is the first result
        first_ms = total_ms
    result.model = job.ref or pool.ref
    lora = None if isinstance(job.task, EmbedTask) else job.task.lora
    if lora is not None and not isinstance(result, Embeddings):
        result.adapter = ModelRef(lora.name, lora.sha256[:VERSION_CHARS])
    result.timings = Timings(queue_ms=queue_ms, first_token_ms=first_ms, total_ms=total_ms)
    return result


async def _outliving(work: Coroutine[Any, Any, T]) -> T:
    """Run `work` to its end even if the awaiting caller is cancelled. A failure nobody
    awaits any more is already logged where it happened; retrieving it here keeps asyncio
    from reporting it again."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return await asyncio.shield(task)
