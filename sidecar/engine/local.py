"""The Engine interface the server programs against, and its pool-backed implementation.

`PoolEngine` runs each named model in a `ModelPool`; what a pool runs jobs on is a
slot kind: "process" (spawned workers, the default), "thread" (in-process, for
debugging) or "fake" (no llama.cpp, for fast service tests). Scheduling, validation,
timings and model resolution are the same code for all three.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Protocol, TypeVar

from sidecar.config import Config
from sidecar.domain.errors import (
    FailedPrecondition,
    InternalError,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    SidecarError,
    SwapRefused,
)
from sidecar.domain.names import shown
from sidecar.domain.status import PoolStatus, SwapResult
from sidecar.domain.types import (
    Classification,
    Embeddings,
    Extraction,
    Generation,
    Result,
    StreamableTask,
    Task,
    Timings,
    TokenEvent,
)
from sidecar.engine.fake import FakeSlot
from sidecar.engine.mappings import open_files
from sidecar.engine.pool import Job, ModelPool
from sidecar.engine.slots import ProcessSlot, SlotFactory, ThreadSlot
from sidecar.engine.swap import STRATEGIES, Progress, swap
from sidecar.gguf_check import GGUFError
from sidecar.store import ModelStore, startup_blob
from sidecar.validate import Limits, check

SLOT_KINDS: dict[str, SlotFactory] = {
    "process": ProcessSlot,
    "thread": ThreadSlot,
    "fake": FakeSlot,
}


class Engine(Protocol):
    default_model: str

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def run(self, model: str, task: Task, caller: str) -> Result: ...
    def stream(
        self, model: str, task: StreamableTask, caller: str
    ) -> AsyncGenerator[TokenEvent | Generation, None]: ...
    def status(self) -> list[tuple[PoolStatus, bool]]: ...
    @property
    def ready(self) -> bool: ...


class PoolEngine:
    def __init__(
        self,
        config: Config,
        slot_kind: str = "process",
        make_slot: SlotFactory | None = None,
        store: ModelStore | None = None,
    ) -> None:
        self.config = config
        factory = make_slot or SLOT_KINDS[slot_kind]
        self.pools = {
            m.name: ModelPool(m, factory, config.server.default_max_tokens) for m in config.models
        }
        self.default_model = config.default_model
        self.store = store or ModelStore(config.store.path)
        self.shed_reason: str | None = None  # set by the supervisor under memory pressure
        self.on_result: Callable[[Result], None] = lambda _r: None  # metrics hook

    async def start(self) -> None:
        try:
            for name, pool in self.pools.items():
                blob = await asyncio.to_thread(startup_blob, self.store, name, pool.config.path)
                pool.use_file(blob)
            await asyncio.gather(*(p.start(p.config.path.stem) for p in self.pools.values()))
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self.pools.values()), return_exceptions=True)

    @property
    def ready(self) -> bool:
        return bool(self.pools) and all(p.ready for p in self.pools.values())

    def pool(self, model: str) -> ModelPool:
        name = model or self.default_model
        pool = self.pools.get(name)
        if pool is None:
            known = ", ".join(sorted(self.pools)) or "none"
            raise ModelNotFound(f"no model named {shown(name)} is loaded (loaded: {known})")
        return pool

    def check(self, model: str, task: Task) -> ModelPool:
        """Refuse bad input against `model`'s limits, wherever the task will run: a request
        bound for the cloud is bounded exactly like one for a worker."""
        pool = self.pool(model)
        s = self.config.server
        check(task, Limits(pool.config.context, s.max_labels, s.max_embed_texts))
        return pool

    def _submit(
        self, model: str, task: Task, caller: str, stream: bool, background: bool = False
    ) -> tuple[ModelPool, Job]:
        pool = self.pool(model)
        if self.shed_reason:
            raise Overloaded(self.shed_reason)
        self.check(model, task)
        return pool, pool.submit(task, caller, stream, background)

    async def run(self, model: str, task: Task, caller: str, *, background: bool = False) -> Result:
        """Run `task`; `background` work waits until no live request does (few-shot builds)."""
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
        self, model: str, task: StreamableTask, caller: str
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
        progress: Progress = lambda _stage, _detail: None,
        move_source: bool = False,
    ) -> SwapResult:
        """Swap `name` to a stored version or a new file. Refused swaps quarantine the file."""
        pool = self.pool(name)
        name = pool.config.name
        strategy = strategy or self.config.store.swap_strategy
        if strategy not in STRATEGIES:
            raise InvalidRequest(
                f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}"
            )
        if pool.swap_lock.locked():
            raise FailedPrecondition(
                f"a swap of {pool.ref.name!r} is in progress: wait for it to finish"
            )
        async with pool.swap_lock:
            # Held from here until the pointers name it: no gc between add and load.
            sha = await self._resolve(pool, version, path, progress, move_source)
            held = True
            try:
                if sha[:12] == pool.ref.version:
                    progress("done", f"{pool.ref.name} already serves {pool.ref.version}")
                    return SwapResult(pool.ref, pool.ref, strategy, 0.0)
                s = self.config.store
                try:
                    result = await swap(
                        pool,
                        self.store.blob(sha),
                        sha,
                        strategy,
                        progress,
                        s.drain_seconds,
                        s.swap_wait_seconds,
                    )
                except SwapRefused as e:
                    self.store.release(sha)
                    held = False
                    in_use = self.in_use()
                    where = await asyncio.to_thread(self._refuse, name, sha, e.reason, in_use)
                    pool.last_swap = (
                        f"refused {sha[:12]} at {e.stage}: {e.reason} (quarantined as {where.name})"
                    )
                    progress("failed", pool.last_swap)
                    raise
                await asyncio.to_thread(self.store.activate, name, sha)
            finally:
                if held:
                    self.store.release(sha)
            pool.last_swap = f"{result.old.version} -> {result.new.version} ({result.strategy}, {result.seconds:.1f}s)"
            return result

    async def _resolve(
        self,
        pool: ModelPool,
        version: str,
        path: Path | None,
        progress: Progress,
        move_source: bool,
    ) -> str:
        if path is not None:
            progress("adding", f"{path} to the store")
            try:
                return await asyncio.to_thread(
                    functools.partial(self.store.add, path, pool.config.name, hold=True)
                )
            except GGUFError as e:
                where = await asyncio.to_thread(
                    self.store.quarantine, path, e.message, move=move_source
                )
                pool.last_swap = f"refused {path.name}: {e.message} (quarantined as {where.name})"
                progress("failed", pool.last_swap)
                raise SwapRefused("validating", e.message) from None
        if not version:
            raise InvalidRequest("name a version (NAME@VERSION) or a file to swap to")
        sha = self.store.resolve(pool.config.name, version)
        self.store.hold(sha)
        try:
            # Stored, but loaded again now: make sure its bytes are still the ones hashed.
            progress("verifying", f"{sha[:12]} in the store")
            await asyncio.to_thread(self.store.verify, sha)
        except BaseException:
            self.store.release(sha)
            raise
        return sha

    def _refuse(self, name: str, sha: str, reason: str, in_use: dict[str, str]) -> Path:
        where = self.store.quarantine(self.store.blob(sha), reason, move=False)
        with contextlib.suppress(SidecarError):
            self.store.remove(name, sha, in_use)
        return where

    def in_use(self) -> dict[str, str]:
        """sha256 of every store blob a live worker maps or has open (draining ones
        included) -> which worker: read from /proc where it can be, else the file the
        worker was started on. Call it on the event loop: it reads the pools."""
        blobs = self.store.blobs.resolve()
        found: dict[str, str] = {}
        for name, pool in self.pools.items():
            for slot in pool.workers():
                pid, state = slot.info.pid, slot.info.state
                if state in ("dead", "stopped"):
                    continue
                files = open_files(pid) if pid is not None else None
                if files is None or state == "starting":  # not yet open: its spec says
                    files = (files or set()) | {slot.spec.path.resolve()}
                for f in files:
                    if f.parent == blobs and f.suffix == ".gguf":
                        who = f"worker pid {pid} of model {name!r}" if pid else f"model {name!r}"
                        found.setdefault(f.stem, who)
        return found

    def status(self) -> list[tuple[PoolStatus, bool]]:
        return [(p.status(), name == self.default_model) for name, p in self.pools.items()]


R = TypeVar("R", bound=Generation | Classification | Extraction | Embeddings)


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
    result.timings = Timings(queue_ms=queue_ms, first_token_ms=first_ms, total_ms=total_ms)
    return result
