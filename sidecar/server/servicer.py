"""gRPC servicers. They only translate: proto -> domain task, engine call, domain -> proto.

Errors are raised, never aborted by hand; the interceptor maps them.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil

from sidecar.domain.errors import InternalError
from sidecar.domain.names import check_name
from sidecar.domain.types import (
    Classification,
    Embeddings,
    Extraction,
    Generation,
    RouteRequest,
    StreamableTask,
    TokenEvent,
)
from sidecar.metrics import Metrics
from sidecar.router.engine import RouterEngine
from sidecar.server import convert
from sidecar.server.accounting import outlives_call
from sidecar.server.caller import caller_of
from sidecar.supervisor import Supervisor
from sidecar.update.updater import Updater
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc as pb_grpc

R = TypeVar("R")


def _expect(result: object, kind: type[R]) -> R:
    if not isinstance(result, kind):  # pragma: no cover - an engine bug
        raise InternalError(f"engine returned {type(result).__name__}, expected {kind.__name__}")
    return result


def _name(model: str) -> str:
    """A model name an admin call will touch the store with: checked (empty = the default)."""
    return check_name(model) if model else model


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, engine: RouterEngine) -> None:
        self.engine = engine

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateReply:
        result = await self.engine.run(
            request.model,
            convert.generate_task(request),
            caller_of(context),
            convert.route_request(request),
        )
        return convert.generate_reply(_expect(result, Generation))

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: Any
    ) -> AsyncIterator[pb.GenerateChunk]:
        route = convert.route_request(request)
        async for chunk in self._stream(
            request.model, convert.generate_task(request), context, route
        ):
            yield chunk

    async def Chat(self, request: pb.ChatRequest, context: Any) -> pb.GenerateReply:
        result = await self.engine.run(
            request.model,
            convert.chat_task(request),
            caller_of(context),
            convert.route_request(request),
        )
        return convert.generate_reply(_expect(result, Generation))

    async def ChatStream(
        self, request: pb.ChatRequest, context: Any
    ) -> AsyncIterator[pb.GenerateChunk]:
        route = convert.route_request(request)
        async for chunk in self._stream(request.model, convert.chat_task(request), context, route):
            yield chunk

    async def _stream(
        self, model: str, task: StreamableTask, context: Any, route: RouteRequest
    ) -> AsyncIterator[pb.GenerateChunk]:
        async for event in self.engine.stream(model, task, caller_of(context), route):
            if isinstance(event, TokenEvent):
                yield convert.chunk(event)
            else:
                yield convert.final_chunk(event)

    async def Classify(self, request: pb.ClassifyRequest, context: Any) -> pb.ClassifyReply:
        result = await self.engine.run(
            request.model,
            convert.classify_task(request),
            caller_of(context),
            convert.route_request(request),
        )
        return convert.classify_reply(_expect(result, Classification))

    async def Extract(self, request: pb.ExtractRequest, context: Any) -> pb.ExtractReply:
        result = await self.engine.run(
            request.model,
            convert.extract_task(request),
            caller_of(context),
            convert.route_request(request),
        )
        return convert.extract_reply(_expect(result, Extraction))

    async def Embed(self, request: pb.EmbedRequest, context: Any) -> pb.EmbedReply:
        result = await self.engine.run(
            request.model, convert.embed_task(request), caller_of(context)
        )
        return convert.embed_reply(_expect(result, Embeddings))


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(
        self,
        supervisor: Supervisor,
        socket: Path,
        metrics: Metrics,
        updater: Updater,
        router: RouterEngine | None = None,
    ) -> None:
        self.router = router
        self.supervisor = supervisor
        self.updater = updater
        self.engine = supervisor.engine
        self.socket = socket
        self.metrics = metrics
        self.started = time.monotonic()
        self.drop_watcher: Callable[[], str] = lambda: ""  # the daemon sets it once watching

    def _models(self) -> list[pb.ModelStatus]:
        errors = self.supervisor.probe_errors
        return [
            convert.model_status(
                s,
                is_default,
                errors.get(s.model.name),
                self.updater.last.get(s.model.name, ""),
                self.updater.fetching(s.model.name),
            )
            for s, is_default in self.engine.status()
        ]

    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.StatusReply:
        reply = convert.status_reply(
            pid=os.getpid(),
            uptime_s=time.monotonic() - self.started,
            socket=str(self.socket),
            models=self._models(),
            counters=self.metrics.counts(),
            memory_available=psutil.virtual_memory().available,
            shedding=self.engine.shed_reason or "",
            last_reload=self.supervisor.last_reload,
            cloud=convert.cloud_status(self.router) if self.router is not None else None,
        )
        reply.drop_watcher = self.drop_watcher()
        return reply

    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsReply:
        return pb.ListModelsReply(models=self._models())

    async def Swap(self, request: pb.SwapRequest, context: Any) -> AsyncIterator[pb.SwapProgress]:
        started = time.monotonic()
        updates: asyncio.Queue[pb.SwapProgress] = asyncio.Queue()

        def progress(stage: str, detail: str) -> None:
            ms = (time.monotonic() - started) * 1000
            updates.put_nowait(pb.SwapProgress(stage=stage, detail=detail, elapsed_ms=ms))

        # The swap runs to its end even if this caller goes away: half a swap helps nobody.
        swap = outlives_call(
            asyncio.ensure_future(
                self.engine.swap(
                    _name(request.model),
                    version=request.version,
                    path=Path(request.path) if request.path else None,
                    strategy=request.strategy,
                    progress=progress,
                )
            )
        )
        while not swap.done() or not updates.empty():
            if updates.empty():
                await asyncio.wait({swap}, timeout=0.05)
                continue
            yield updates.get_nowait()
        result = swap.result()  # a refusal raises here; the interceptor maps it
        yield convert.swap_done(result, (time.monotonic() - started) * 1000)

    async def ListVersions(
        self, request: pb.ListVersionsRequest, context: Any
    ) -> pb.ListVersionsReply:
        store = self.engine.store
        serving = {(p.config.name, p.ref.version) for p in self.engine.pools.values()}
        versions = await asyncio.to_thread(store.all_versions)
        return pb.ListVersionsReply(
            versions=[convert.stored_version(v, (v.name, v.short) in serving) for v in versions],
            store=str(store.root),
        )

    async def AddModel(self, request: pb.AddModelRequest, context: Any) -> pb.AddModelReply:
        store = self.engine.store
        name = _name(request.model) or self.engine.default_model
        sha = await asyncio.to_thread(store.add, Path(request.path), name)
        info = await asyncio.to_thread(store.info, name, sha)
        return pb.AddModelReply(version=convert.stored_version(info, False))

    async def RemoveVersion(
        self, request: pb.RemoveVersionRequest, context: Any
    ) -> pb.RemoveVersionReply:
        store = self.engine.store
        name = _name(request.model) or self.engine.default_model
        sha = store.resolve(name, request.version)
        await asyncio.to_thread(store.remove, name, sha, self.engine.in_use())
        return pb.RemoveVersionReply()

    async def CollectGarbage(
        self, request: pb.CollectGarbageRequest, context: Any
    ) -> pb.CollectGarbageReply:
        store = self.engine.store
        removed = await asyncio.to_thread(store.gc, self.engine.in_use())
        if request.empty_quarantine:
            emptied = await asyncio.to_thread(store.quarantine_cleanup, empty=True)
            removed += [f"quarantine/{e}" for e in emptied]
        return pb.CollectGarbageReply(removed=removed)

    async def CheckUpdate(self, request: pb.UpdateRequest, context: Any) -> pb.UpdateCheck:
        return convert.update_check(await self.updater.check(request.model))

    async def ApplyUpdate(
        self, request: pb.UpdateRequest, context: Any
    ) -> AsyncIterator[pb.UpdateProgress]:
        started = time.monotonic()
        updates: asyncio.Queue[pb.UpdateProgress] = asyncio.Queue()

        def progress(stage: str, detail: str, done: int, total: int) -> None:
            ms = (time.monotonic() - started) * 1000
            updates.put_nowait(convert.update_progress(stage, detail, done, total, ms))

        # A download nobody waits for is stopped when this caller goes away (its partial
        # file stays for the next apply); from install on, like a swap, it runs to its end.
        owner = object()
        run = outlives_call(
            asyncio.ensure_future(self.updater.apply(request.model, progress, owner))
        )
        try:
            while not run.done() or not updates.empty():
                if updates.empty():
                    await asyncio.wait({run}, timeout=0.05)
                    continue
                yield updates.get_nowait()
        finally:
            if not run.done():
                self.updater.abandon(request.model, owner)
                run.add_done_callback(lambda t: t.cancelled() or t.exception())
        outcome = run.result()  # a refusal raises here; the interceptor maps it
        yield convert.update_done(outcome, (time.monotonic() - started) * 1000)
