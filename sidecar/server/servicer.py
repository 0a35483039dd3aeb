"""gRPC servicers. They only translate: proto -> domain task, engine call, domain -> proto.

Errors are raised, never aborted by hand; the interceptor maps them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from sidecar.domain.errors import InternalError
from sidecar.domain.progress import Progress
from sidecar.domain.seam import Admin, Engine
from sidecar.domain.status import SwapResult
from sidecar.domain.types import (
    Classification,
    Embeddings,
    Extraction,
    Generation,
    RouteRequest,
    StreamableTask,
    TokenEvent,
)
from sidecar.domain.updates import Outcome
from sidecar.server import convert
from sidecar.server.caller import caller_of
from sidecar.server.progress_stream import progress_stream
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc as pb_grpc

R = TypeVar("R")


def _expect(result: object, kind: type[R]) -> R:
    if not isinstance(result, kind):  # pragma: no cover - an engine bug
        raise InternalError(f"engine returned {type(result).__name__}, expected {kind.__name__}")
    return result


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateReply:
        result = await self.engine.run(
            request.model,
            convert.generate_task(request),
            caller_of(context),
            route=convert.route_request(request),
            background=convert.low_priority(request),
        )
        return convert.generate_reply(_expect(result, Generation))

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: Any
    ) -> AsyncIterator[pb.GenerateChunk]:
        route = convert.route_request(request)
        convert.normal_priority(request)
        async for chunk in self._stream(
            request.model, convert.generate_task(request), context, route
        ):
            yield chunk

    async def Chat(self, request: pb.ChatRequest, context: Any) -> pb.GenerateReply:
        result = await self.engine.run(
            request.model,
            convert.chat_task(request),
            caller_of(context),
            route=convert.route_request(request),
            background=convert.low_priority(request),
        )
        return convert.generate_reply(_expect(result, Generation))

    async def ChatStream(
        self, request: pb.ChatRequest, context: Any
    ) -> AsyncIterator[pb.GenerateChunk]:
        route = convert.route_request(request)
        convert.normal_priority(request)
        async for chunk in self._stream(request.model, convert.chat_task(request), context, route):
            yield chunk

    async def _stream(
        self, model: str, task: StreamableTask, context: Any, route: RouteRequest
    ) -> AsyncIterator[pb.GenerateChunk]:
        async for event in self.engine.stream(model, task, caller_of(context), route=route):
            if isinstance(event, TokenEvent):
                yield convert.chunk(event)
            else:
                yield convert.final_chunk(event)

    async def Classify(self, request: pb.ClassifyRequest, context: Any) -> pb.ClassifyReply:
        result = await self.engine.run(
            request.model,
            convert.classify_task(request),
            caller_of(context),
            route=convert.route_request(request),
            background=convert.low_priority(request),
        )
        return convert.classify_reply(_expect(result, Classification))

    async def Extract(self, request: pb.ExtractRequest, context: Any) -> pb.ExtractReply:
        result = await self.engine.run(
            request.model,
            convert.extract_task(request),
            caller_of(context),
            route=convert.route_request(request),
            background=convert.low_priority(request),
        )
        return convert.extract_reply(_expect(result, Extraction))

    async def Embed(self, request: pb.EmbedRequest, context: Any) -> pb.EmbedReply:
        result = await self.engine.run(
            request.model, convert.embed_task(request), caller_of(context)
        )
        return convert.embed_reply(_expect(result, Embeddings))


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, admin: Admin) -> None:
        self.admin = admin

    async def Load(self, request: pb.ResidencyRequest, context: Any) -> pb.ResidencyReply:
        return convert.residency_reply(await self.admin.load(request.model))

    async def Unload(self, request: pb.ResidencyRequest, context: Any) -> pb.ResidencyReply:
        return convert.residency_reply(await self.admin.unload(request.model))

    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.StatusReply:
        return convert.status_reply(self.admin.status())

    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsReply:
        return pb.ListModelsReply(models=[convert.model_status(m) for m in self.admin.models()])

    async def Swap(self, request: pb.SwapRequest, context: Any) -> AsyncIterator[pb.SwapProgress]:
        path = Path(request.path) if request.path else None

        def swap(progress: Progress) -> Coroutine[Any, Any, SwapResult]:
            return self.admin.swap(request.model, request.version, path, request.strategy, progress)

        async for message in progress_stream(swap, convert.swap_progress, convert.swap_done):
            yield message

    async def ListVersions(
        self, request: pb.ListVersionsRequest, context: Any
    ) -> pb.ListVersionsReply:
        return convert.versions_reply(await self.admin.versions())

    async def AddModel(self, request: pb.AddModelRequest, context: Any) -> pb.AddModelReply:
        added = await self.admin.add_model(request.model, Path(request.path), request.adapter_for)
        return pb.AddModelReply(version=convert.stored_version(added))

    async def RemoveVersion(
        self, request: pb.RemoveVersionRequest, context: Any
    ) -> pb.RemoveVersionReply:
        await self.admin.remove_version(request.model, request.version)
        return pb.RemoveVersionReply()

    async def CollectGarbage(
        self, request: pb.CollectGarbageRequest, context: Any
    ) -> pb.CollectGarbageReply:
        removed = await self.admin.collect_garbage(request.empty_quarantine)
        return pb.CollectGarbageReply(removed=removed)

    async def CheckUpdate(self, request: pb.UpdateRequest, context: Any) -> pb.UpdateCheck:
        check = await self.admin.check_update(request.model, request.ignore_rollout)
        return convert.update_check(check)

    async def ApplyUpdate(
        self, request: pb.UpdateRequest, context: Any
    ) -> AsyncIterator[pb.UpdateProgress]:
        # A download nobody waits for is stopped when this caller goes away (its partial
        # file stays for the next apply); from install on, like a swap, it runs to its end.
        owner = object()

        def apply(progress: Progress) -> Coroutine[Any, Any, Outcome]:
            return self.admin.apply_update(request.model, progress, owner, request.ignore_rollout)

        def leave() -> bool:
            return self.admin.abandon_update(request.model, owner)

        async for message in progress_stream(
            apply, convert.update_progress, convert.update_done, on_leave=leave
        ):
            yield message

    async def Logs(self, request: pb.LogsRequest, context: Any) -> AsyncIterator[pb.LogLine]:
        # A follower leaves by cancelling: the generator is closed and stops waiting.
        async for line in self.admin.logs(request.lines, request.follow):
            yield convert.log_line(line)
