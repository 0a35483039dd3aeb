"""The local engine: the named models of this machine, each run by a pool of workers.

`PoolEngine` implements the `Engine` seam (sidecar.domain.seam) over one `ModelPool` per
named model; what a pool runs jobs on is a slot kind: "process" (spawned workers, the
default), "thread" (in-process, for debugging) or "fake" (no llama.cpp, for fast service
tests). Scheduling, validation, timings and model resolution are the same code for all
three. Swaps are the `Swapper`'s (engine/swap.py); the engine only names the pool.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import TypeVar

from sidecar.config import Config
from sidecar.domain.errors import InternalError, ModelNotFound, Overloaded, SidecarError
from sidecar.domain.names import shown
from sidecar.domain.progress import Progress, ignore
from sidecar.domain.seam import DEFAULT_ROUTE
from sidecar.domain.status import PoolStatus, SwapResult
from sidecar.domain.types import (
    Classification,
    Embeddings,
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
from sidecar.engine.fake import FakeSlot
from sidecar.engine.pool import Job, ModelPool
from sidecar.engine.slots import ProcessSlot, SlotFactory, ThreadSlot
from sidecar.engine.swap import Swapper
from sidecar.store import ModelStore, startup_blob
from sidecar.validate import Limits, check

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
        factory = make_slot or SLOT_KINDS[slot_kind]
        self.pools = {
            m.name: ModelPool(m, factory, config.server.default_max_tokens) for m in config.models
        }
        self.default_model = config.default_model
        self.store = store or ModelStore(config.store.path)
        self.shed_reason: str | None = None  # set by the supervisor under memory pressure
        self.on_result: Callable[[Result], None] = lambda _r: None  # metrics hook
        self.swapper = Swapper(self.pools, self.store, lambda: self.config.store)

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

    def ref(self, model: str) -> ModelRef:
        return self.pool(model).ref

    def check(self, model: str, task: Task) -> None:
        """Refuse bad input against `model`'s limits, wherever the task will run: a request
        bound for the cloud is bounded exactly like one for a worker."""
        pool = self.pool(model)
        s = self.config.server
        check(task, Limits(pool.config.context, s.max_labels, s.max_embed_texts))

    def _submit(
        self, model: str, task: Task, caller: str, stream: bool, background: bool = False
    ) -> tuple[ModelPool, Job]:
        pool = self.pool(model)
        if self.shed_reason:
            raise Overloaded(self.shed_reason)
        self.check(model, task)
        return pool, pool.submit(task, caller, stream, background)

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
    ) -> SwapResult:
        """Swap `name` to a stored version or a new file (see `Swapper.swap`)."""
        return await self.swapper.swap(
            self.pool(name),
            version=version,
            path=path,
            strategy=strategy,
            progress=progress,
            move_source=move_source,
        )

    def in_use(self) -> dict[str, str]:
        """sha256 of every store blob a live worker maps -> which worker (see `Swapper`)."""
        return self.swapper.in_use()

    def status(self) -> list[tuple[PoolStatus, bool]]:
        return [
            (p.status(self.swapper.last_swap(name)), name == self.default_model)
            for name, p in self.pools.items()
        ]


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
