"""The OpenAI-compatible HTTP API. Like the gRPC servicer, it only translates.

A request is parsed by `wire` into the same domain task gRPC builds and handed to the
same `Engine` object the gRPC servicer holds, so admission control (queues, shedding,
fair turns), validation, metrics and whatever wraps the engine apply to both front ends
alike. Errors keep one mapping: domain error -> gRPC status code (the interceptor's
table) -> HTTP status here, with the error body the OpenAI SDKs parse.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from grpc import StatusCode
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sidecar.calls.accounting import RequestLog
from sidecar.calls.callers import CALLER_HEADER, Bearer, caller_key
from sidecar.calls.outcome import status_for, told
from sidecar.domain.errors import (
    Cancelled,
    InternalError,
    InvalidRequest,
    ModelNotFound,
    SidecarError,
)
from sidecar.domain.names import shown
from sidecar.domain.seam import Engine
from sidecar.domain.types import (
    ChatTask,
    Embeddings,
    Extraction,
    ExtractTask,
    GenerateTask,
    Generation,
    TokenEvent,
)
from sidecar.openai_api import wire

log = logging.getLogger("sidecar.http")

# gRPC status -> (HTTP status, OpenAI error type). Anything unlisted is a 500.
HTTP_STATUS: dict[StatusCode, tuple[int, str]] = {
    StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    StatusCode.NOT_FOUND: (404, "not_found_error"),
    StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    StatusCode.UNAVAILABLE: (503, "server_error"),
    StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    StatusCode.CANCELLED: (499, "cancelled"),
    StatusCode.INTERNAL: (500, "server_error"),
}
RETRYABLE = {StatusCode.RESOURCE_EXHAUSTED, StatusCode.UNAVAILABLE}
# Bodies up to this size are parsed on the event loop (a thread hop costs more than that).
INLINE_PARSE_BYTES = 64 * 1024


class BodyTooLarge(InvalidRequest):
    pass


def error_body(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(e: BaseException, rid: str, method: str) -> tuple[Response, StatusCode]:
    code = status_for(e) if isinstance(e, SidecarError) else StatusCode.INTERNAL
    status, kind = HTTP_STATUS.get(code, (500, "server_error"))
    if isinstance(e, BodyTooLarge):
        status = 413
    headers = {"x-request-id": rid}
    if code in RETRYABLE:
        headers["retry-after"] = "1"
    body = error_body(told(e, rid, method), kind, code.name.lower())
    return JSONResponse(body, status_code=status, headers=headers), code


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class Call:
    """One HTTP request's id, timing and its single log line + metrics sample."""

    def __init__(self, requests: RequestLog, request: Request) -> None:
        self.rid = uuid.uuid4().hex[:12]
        self.route = request.url.path
        self.method = f"{request.method} {self.route}"
        self.model: str | None = None
        self._requests = requests
        self._started = time.perf_counter()
        self._done = False

    def done(self, code: StatusCode, http_status: int) -> None:
        if self._done:
            return
        self._done = True
        seconds = time.perf_counter() - self._started
        self._requests.record(
            self.rid, self.method, self.route, self.model, code.name, seconds, http=http_status
        )


Handler = Callable[[Request, Call], Awaitable[Response]]


class OpenAIApp:
    def __init__(self, engine: Engine, requests: RequestLog, token: str, max_body: int) -> None:
        self.engine = engine
        self.requests = requests
        self._bearer = Bearer(
            token, "send 'Authorization: Bearer <http.token>' (the OpenAI SDKs' api_key)"
        )
        self._max_body = max_body

    def asgi(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self._wrap(self.chat), methods=["POST"]),
            Route("/v1/completions", self._wrap(self.completions), methods=["POST"]),
            Route("/v1/embeddings", self._wrap(self.embeddings), methods=["POST"]),
            Route("/v1/models", self._wrap(self.models), methods=["GET"]),
            Route("/v1/models/{name:path}", self._wrap(self.model), methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ]
        return Starlette(routes=routes, exception_handlers={HTTPException: self._http_error})

    # ---------------------------------------------------------------- plumbing

    def _wrap(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            call = Call(self.requests, request)
            try:
                self._authenticate(request)
                response = await handler(request, call)
            except asyncio.CancelledError:
                call.done(StatusCode.CANCELLED, 499)
                raise
            except Exception as e:  # SidecarError, or a bug: `told` keeps internals in the log
                response, code = error_response(e, call.rid, call.method)
                call.done(code, response.status_code)
                return response
            response.headers["x-request-id"] = call.rid
            if not isinstance(response, StreamingResponse):  # a stream records when it ends
                call.done(StatusCode.OK, response.status_code)
            return response

        return endpoint

    def _authenticate(self, request: Request) -> None:
        self._bearer.check(request.headers.get("authorization", ""))

    async def _json(self, request: Request) -> object:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_body:
            raise BodyTooLarge(f"the body is {declared} bytes; the limit is {self._max_body}")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self._max_body:
                    raise BodyTooLarge(f"the body is over the {self._max_body}-byte limit")
                chunks.append(chunk)
        except ClientDisconnect:  # gone, or cut by the listener's body timeout
            raise Cancelled("the connection closed before the whole body arrived") from None
        data = b"".join(chunks)
        if size <= INLINE_PARSE_BYTES:
            return wire.parse_body(data)
        return await asyncio.to_thread(wire.parse_body, data)  # ~0.1 s for 4 MB: off the loop

    @staticmethod
    def _caller(request: Request) -> str:
        """The fair queue's key, as gRPC's: the token, else a named app, else the peer."""
        peer = f"http:{request.client.host}" if request.client else "http:unix"
        h = request.headers
        return caller_key(h.get("authorization"), h.get(CALLER_HEADER), peer)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed"}
        text = message.get(exc.status_code, exc.detail)
        return JSONResponse(
            error_body(
                f"{text} (see /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings)",
                "invalid_request_error",
            ),
            status_code=exc.status_code,
        )

    # ---------------------------------------------------------------- routes

    async def health(self, request: Request) -> Response:
        ready = self.engine.ready
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    def _model_ids(self) -> list[str]:
        """What a request's `model` may name: each model, then each of its adapters as
        MODEL:ADAPTER (the form the requests take)."""
        ids = []
        for s, _ in self.engine.status():
            ids += [s.model.name, *(f"{s.model.name}:{a}" for a in s.adapters)]
        return ids

    async def models(self, request: Request, call: Call) -> Response:
        return JSONResponse(wire.model_list(self._model_ids()))

    async def model(self, request: Request, call: Call) -> Response:
        name = request.path_params["name"]
        call.model = name
        names = self._model_ids()
        if name not in names:
            raise ModelNotFound(
                f"no model named {shown(name)} is loaded (loaded: {', '.join(names)})"
            )
        return JSONResponse(wire.model_entry(name))

    async def chat(self, request: Request, call: Call) -> Response:
        parsed = wire.chat_request(await self._json(request))
        call.model = parsed.model
        reply = wire.Reply(
            call.rid,
            parsed.model or self.engine.default_model,
            logprobs=isinstance(parsed.task, ChatTask) and parsed.task.logprobs,
            adapter=parsed.task.adapter if isinstance(parsed.task, ChatTask | ExtractTask) else "",
        )
        caller = self._caller(request)
        if isinstance(parsed.task, ExtractTask):
            result = await self.engine.run(parsed.model, parsed.task, caller, route=parsed.route)
            if not isinstance(result, Extraction):  # pragma: no cover - an engine bug
                raise InternalError("Extract returned no extraction")
            if not parsed.stream:
                return JSONResponse(reply.chat(result))
            return self._replay(call, reply, result, parsed.include_usage)
        if not parsed.stream:
            result = await self.engine.run(parsed.model, parsed.task, caller, route=parsed.route)
            if not isinstance(result, Generation):  # pragma: no cover
                raise InternalError("Chat returned no generation")
            return JSONResponse(reply.chat(result))
        if not isinstance(parsed.task, ChatTask):  # pragma: no cover - wire's contract
            raise InternalError("a chat request parsed to a non-chat task")
        events = self.engine.stream(parsed.model, parsed.task, caller, route=parsed.route)

        def render(event: TokenEvent | Generation) -> list[dict[str, Any]]:
            if isinstance(event, TokenEvent):
                return [reply.chat_chunk({"content": event.text}, logprobs=event.logprobs)]
            out = [reply.chat_chunk({}, event.finish_reason, event.model)]
            return out + ([reply.usage_chunk("chat", event)] if parsed.include_usage else [])

        opening = [reply.chat_chunk({"role": "assistant", "content": ""})]
        return await self._stream(call, events, opening, render)

    async def completions(self, request: Request, call: Call) -> Response:
        parsed = wire.completion_request(await self._json(request))
        call.model = parsed.model
        task = parsed.task
        reply = wire.Reply(
            call.rid,
            parsed.model or self.engine.default_model,
            logprobs=isinstance(task, GenerateTask) and task.logprobs,
            text_offset=len(task.prompt) if isinstance(task, GenerateTask) else 0,
            adapter=task.adapter if isinstance(task, GenerateTask) else "",
        )
        caller = self._caller(request)
        if not parsed.stream:
            result = await self.engine.run(parsed.model, parsed.task, caller, route=parsed.route)
            if not isinstance(result, Generation):  # pragma: no cover
                raise InternalError("Generate returned no generation")
            return JSONResponse(reply.completion(result))
        if not isinstance(parsed.task, GenerateTask):  # pragma: no cover - wire's contract
            raise InternalError("a completion request parsed to a non-generate task")
        events = self.engine.stream(parsed.model, parsed.task, caller, route=parsed.route)

        def render(event: TokenEvent | Generation) -> list[dict[str, Any]]:
            if isinstance(event, TokenEvent):
                return [reply.completion_chunk(event.text, logprobs=event.logprobs)]
            out = [reply.completion_chunk("", event.finish_reason, event.model)]
            return out + ([reply.usage_chunk("completion", event)] if parsed.include_usage else [])

        return await self._stream(call, events, [], render)

    async def embeddings(self, request: Request, call: Call) -> Response:
        parsed = wire.embedding_request(await self._json(request))
        call.model = parsed.model
        result = await self.engine.run(parsed.model, parsed.task, self._caller(request))
        if not isinstance(result, Embeddings):  # pragma: no cover
            raise InternalError("Embed returned no embeddings")
        reply = wire.Reply(call.rid, parsed.model or self.engine.default_model)
        return JSONResponse(reply.embeddings(result, parsed.encoding, parsed.dimensions))

    # ---------------------------------------------------------------- streaming

    async def _stream(
        self,
        call: Call,
        events: AsyncIterator[TokenEvent | Generation],
        opening: list[dict[str, Any]],
        render: Callable[[TokenEvent | Generation], list[dict[str, Any]]],
    ) -> Response:
        """Server-sent events. The first event is awaited before answering, so a refusal
        (bad input, unknown model, queue full) is a plain HTTP error, not a broken stream."""
        try:
            first = await anext(events)
        except BaseException:
            await _close(events)
            raise

        async def body() -> AsyncIterator[bytes]:
            code, status = StatusCode.OK, 200
            try:
                for payload in opening + render(first):
                    yield sse(payload)
                async for event in events:
                    for payload in render(event):
                        yield sse(payload)
                yield sse("[DONE]")
            except SidecarError as e:
                # Headers are gone; OpenAI's SDKs raise on an `error` event mid-stream.
                code = status_for(e)
                status, kind = HTTP_STATUS.get(code, (500, "server_error"))
                yield sse(error_body(told(e, call.rid, call.method), kind, code.name.lower()))
            except asyncio.CancelledError:  # the client went away: free the worker now
                code, status = StatusCode.CANCELLED, 499
                raise
            finally:
                await _close(events)
                call.done(code, status)

        return StreamingResponse(body(), media_type="text/event-stream", headers=_SSE_HEADERS)

    def _replay(
        self, call: Call, reply: wire.Reply, result: Extraction, include_usage: bool
    ) -> Response:
        """Extract is not streamed token by token (its JSON is validated whole first):
        a streaming caller gets the checked JSON as one chunk."""
        chunks = [
            reply.chat_chunk({"role": "assistant", "content": ""}),
            reply.chat_chunk({"content": result.json}),
            reply.chat_chunk({}, "stop", result.model),
        ]
        if include_usage:
            chunks.append(reply.usage_chunk("chat", result))

        async def body() -> AsyncIterator[bytes]:
            try:
                for payload in chunks:
                    yield sse(payload)
                yield sse("[DONE]")
            finally:
                call.done(StatusCode.OK, 200)

        return StreamingResponse(body(), media_type="text/event-stream", headers=_SSE_HEADERS)


_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def _close(events: AsyncIterator[Any]) -> None:
    """End an engine's stream now, not when it is collected: closing it frees its worker."""
    if isinstance(events, AsyncGenerator):
        await events.aclose()
