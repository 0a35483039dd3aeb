"""The one place domain errors become gRPC status codes; also auth, request logs and metrics.

Every RPC (ours, health, reflection) passes through `RequestInterceptor`, which
- refuses TCP callers without the right bearer token (UNAUTHENTICATED),
- turns a request that does not parse (e.g. invalid UTF-8 in a string field) into
  INVALID_ARGUMENT instead of gRPC's generic deserialisation failure,
- maps `SidecarError` subclasses through `calls.outcome.STATUS` and anything else to
  INTERNAL; an internal error's details go to the log, the caller gets only the request id
  (`told`),
- writes one log line and one metrics sample per request (id, method, model, status,
  milliseconds), on the loop's next turn: the reply does not wait for them; a streamed
  call whose caller left while its work goes on (a swap) is logged when that work ends,
  with the work's outcome and `caller=left`.

It runs for every call, so the per-call part is kept to the call itself (see
scripts/bench-transport): each method's handler is wrapped once and reused; a call's
metadata is read from its own context, only when the bearer check needs it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import StatusCode

from sidecar.calls.accounting import RequestLog, Work, open_work
from sidecar.calls.callers import Bearer
from sidecar.calls.outcome import status_for, told
from sidecar.domain import errors

log = logging.getLogger("sidecar.request")


class BadRequest:
    """Stands in for a request whose bytes did not parse; the handler wrapper rejects it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:
            return BadRequest(
                f"the request could not be parsed ({e}); string fields must be valid UTF-8"
            )

    return parse


def is_tcp(peer: str) -> bool:
    return peer.startswith(("ipv4:", "ipv6:"))


class RequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, requests: RequestLog, tcp_token: str = "") -> None:
        self._bearer = Bearer(
            tcp_token, "TCP callers must send metadata 'authorization: Bearer <server.tcp_token>'"
        )
        self._requests = requests
        # Only methods the server has: a caller's made-up names never grow this.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None:
                return None
            wrapped = self._wrapped[method] = self._wrap(handler, method)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        kinds = {
            "unary_unary": grpc.unary_unary_rpc_method_handler,
            "unary_stream": grpc.unary_stream_rpc_method_handler,
            "stream_unary": grpc.stream_unary_rpc_method_handler,
            "stream_stream": grpc.stream_stream_rpc_method_handler,
        }
        for attr, make in kinds.items():
            inner = getattr(handler, attr)
            if inner is None:
                continue
            streaming_out = attr.endswith("_stream")
            # Streaming handlers either yield (ours) or await context.write() (health Watch).
            yields = streaming_out and inspect.isasyncgenfunction(inner)
            wrapped = (self._wrap_stream if yields else self._wrap_unary)(inner, method)
            return make(
                wrapped,
                request_deserializer=_safe(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler

    # ---------------------------------------------------------------- wrappers
    # One call, unary or streamed: check it, map its error, log it once. Written out in
    # both wrappers rather than as a context manager: this runs for every call.

    def _wrap_unary(self, inner: Any, method: str) -> Any:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            rid, started = _begin(context)
            code = StatusCode.OK
            work = open_work()
            try:
                self._check(request, context)
                return await inner(request, context)
            except asyncio.CancelledError:  # the caller left
                code = StatusCode.CANCELLED
                raise
            except Exception as e:
                code, message = self._fail(e, rid, method)
                await context.abort(code, message, _trailer(e, rid))
            finally:
                self._end(rid, method, request, code, started, work)

        return call

    def _wrap_stream(self, inner: Any, method: str) -> Any:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            rid, started = _begin(context)
            code = StatusCode.OK
            work = open_work()
            try:
                self._check(request, context)
                async for item in inner(request, context):
                    yield item
            except (asyncio.CancelledError, GeneratorExit):  # the caller left mid-stream
                code = StatusCode.CANCELLED
                raise
            except Exception as e:
                code, message = self._fail(e, rid, method)
                await context.abort(code, message, _trailer(e, rid))
            finally:
                self._end(rid, method, request, code, started, work)

        return call

    def _check(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        if self._bearer.required and is_tcp(context.peer()):
            metadata = dict(context.invocation_metadata() or ())
            self._bearer.check(str(metadata.get("authorization", "")))
        if isinstance(request, BadRequest):
            raise errors.InvalidRequest(request.reason)

    def _end(self, rid: str, method: str, request: Any, code: StatusCode, started: float,
             work: Work) -> None:  # fmt: skip
        if code is StatusCode.CANCELLED and work.future is not None:
            # The work goes on without its caller: log what became of it, once known.
            def ended(w: asyncio.Future[Any]) -> None:
                outcome = self._outcome(w, rid, method)
                seconds = time.perf_counter() - started
                self._log(rid, method, request, outcome, seconds, caller="left")

            work.future.add_done_callback(ended)
        else:
            seconds = time.perf_counter() - started
            asyncio.get_running_loop().call_soon(self._log, rid, method, request, code, seconds)

    def _outcome(self, work: asyncio.Future[Any], rid: str, method: str) -> StatusCode:
        if work.cancelled():
            return StatusCode.CANCELLED
        e = work.exception()
        if e is None:
            return StatusCode.OK
        if isinstance(e, errors.SidecarError) and status_for(e) is not StatusCode.INTERNAL:
            return status_for(e)
        told(e, rid, method)  # logs an internal error's details, as for a caller who stayed
        return StatusCode.INTERNAL

    def _fail(self, e: BaseException, rid: str, method: str) -> tuple[StatusCode, str]:
        if isinstance(e, grpc.aio.AbortError):  # a handler aborted already; keep its status
            raise e
        code = status_for(e) if isinstance(e, errors.SidecarError) else StatusCode.INTERNAL
        return code, told(e, rid, method)

    def _log(self, rid: str, method: str, request: Any, code: StatusCode, seconds: float,
             **extra: object) -> None:  # fmt: skip
        model = getattr(request, "model", None)
        rpc = method.rsplit("/", 1)[-1]
        self._requests.record(rid, method, rpc, model, code.name, seconds, **extra)


# Request ids only tell log lines apart: random enough, without a syscall per call.
_ids = random.Random()


def _trailer(e: BaseException, rid: str) -> tuple[tuple[str, str], ...]:
    """The error's trailing metadata: the request id, and the router's cause when it has one
    (so a caller tells "the privacy rules keep this local" from other refusals without
    reading the message)."""
    cause = getattr(e, "cause", "")
    return (("sidecar-request-id", rid),) + ((("sidecar-cause", cause),) if cause else ())


def _begin(context: grpc.aio.ServicerContext) -> tuple[str, float]:
    rid = f"{_ids.getrandbits(48):012x}"
    context.set_trailing_metadata((("sidecar-request-id", rid),))
    return rid, time.perf_counter()
