"""What a client raises when the daemon (or the connection to it) refuses a call.

    grpc.RpcError
    └── grpc.aio.AioRpcError
        └── SidecarError                  .status_code .reason .message .request_id
            ├── InvalidRequestError       INVALID_ARGUMENT, OUT_OF_RANGE: fix the request
            ├── NotFoundError             NOT_FOUND: no such model, version or task
            ├── UnavailableError          UNAVAILABLE: not started, loading, swapping, a
            │                             worker restarting: retryable
            ├── ResourceExhaustedError    RESOURCE_EXHAUSTED: queue full, shedding load, cloud
            │                             budget spent: retryable
            ├── FailedPreconditionError   FAILED_PRECONDITION: a missing prerequisite (no
            │                             cloud configured, a refused swap)
            ├── AuthenticationError       UNAUTHENTICATED: a TCP caller without the token
            ├── PermissionDeniedError     PERMISSION_DENIED
            ├── DeadlineExceededError     DEADLINE_EXCEEDED: the call's timeout passed
            ├── CallCancelledError        CANCELLED (not asyncio's CancelledError)
            └── InternalServerError       INTERNAL and anything else: a bug; the daemon log
                                          has the details under `request_id`

Every class is a `grpc.RpcError` (through `grpc.aio.AioRpcError`, the exception class gRPC's
asyncio API raises), so code that catches gRPC's errors, from the blocking or the asyncio
client, keeps working, with `e.code()` and `e.details()` as gRPC has them.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc import StatusCode

REQUEST_ID = "sidecar-request-id"  # trailing metadata the daemon sends on every call
# A progress stream (swap, update) always ends with its outcome; a proxy might cut it.
ENDED = "the progress stream ended without its outcome"


class SidecarError(grpc.aio.AioRpcError):  # type: ignore[misc]  # grpc has no type stubs
    """A call the daemon refused, or that could not reach it.

    - `status_code`: the `grpc.StatusCode` (also `e.code()`, as on any gRPC error);
    - `reason`: the code as a short machine-readable word (`"resource_exhausted"`), the
      same word the HTTP API puts in `error.code`;
    - `message`: what the daemon said (also `e.details()`);
    - `request_id`: the daemon's id for the call, the one its log line carries; None when
      the call never reached it.
    """

    status_code: StatusCode
    reason: str
    message: str
    request_id: str | None

    def __init__(
        self,
        code: StatusCode,
        message: str,
        *,
        request_id: str | None = None,
        initial_metadata: Any = None,
        trailing_metadata: Any = None,
        debug_error_string: str | None = None,
    ) -> None:
        super().__init__(
            code, initial_metadata or grpc.aio.Metadata(),
            trailing_metadata or grpc.aio.Metadata(), message, debug_error_string,
        )  # fmt: skip
        self.status_code = code
        self.reason = code.name.lower()
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        rid = f" (request {self.request_id})" if self.request_id else ""
        return f"{self.reason}: {self.message}{rid}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status_code!r}, {self.message!r})"

    def __reduce__(self) -> Any:  # picklable, e.g. across a process pool
        return (_rebuild, (type(self), self.status_code, self.message, self.request_id))


def _rebuild(cls: type[SidecarError], code: StatusCode, message: str, rid: str | None) -> Any:
    return cls(code, message, request_id=rid)


class InvalidRequestError(SidecarError):
    """The request is wrong (INVALID_ARGUMENT, OUT_OF_RANGE); the message says what to fix."""


class NotFoundError(SidecarError):
    """No such model, version or task (NOT_FOUND); never a silent fallback."""


class UnavailableError(SidecarError):
    """The daemon cannot serve now (UNAVAILABLE): not listening, loading, swapping, a worker
    restarting. Retried when the client has `retries`."""


class ResourceExhaustedError(SidecarError):
    """Too much at once (RESOURCE_EXHAUSTED): the model's queue is full, memory is low, the
    cloud budget is spent. Retried when the client has `retries`."""


class FailedPreconditionError(SidecarError):
    """A prerequisite is missing (FAILED_PRECONDITION): no cloud configured for a cloud-only
    request, a swap refused (the old model keeps serving), no update origin."""


class AuthenticationError(SidecarError):
    """The bearer token is missing or wrong (UNAUTHENTICATED; TCP callers only)."""


class DeadlineExceededError(SidecarError):
    """The call's timeout passed before the reply (DEADLINE_EXCEEDED)."""


class PermissionDeniedError(SidecarError):
    """The caller may not do this (PERMISSION_DENIED)."""


class CallCancelledError(SidecarError):
    """The call was cancelled (CANCELLED). A stream the asyncio client cancels raises
    asyncio's own CancelledError when read, as gRPC's asyncio API does."""


class InternalServerError(SidecarError):
    """A failure the daemon did not expect (INTERNAL, or a code with no class of its own)."""


# The one table from a status code to the class raised; a code not in it is internal.
ERRORS: dict[StatusCode, type[SidecarError]] = {
    StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    StatusCode.OUT_OF_RANGE: InvalidRequestError,
    StatusCode.NOT_FOUND: NotFoundError,
    StatusCode.UNAVAILABLE: UnavailableError,
    StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    StatusCode.UNAUTHENTICATED: AuthenticationError,
    StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    StatusCode.CANCELLED: CallCancelledError,
}


def from_rpc(error: grpc.RpcError) -> SidecarError:
    """The `SidecarError` for a gRPC error raised by a blocking or an asyncio call."""
    if isinstance(error, SidecarError):
        return error
    code = error.code() if callable(getattr(error, "code", None)) else StatusCode.UNKNOWN
    trailing = _metadata(_call(error, "trailing_metadata"))
    cls = ERRORS.get(code, InternalServerError)
    return cls(
        code,
        str(_call(error, "details") or ""),
        request_id=_request_id(trailing),
        initial_metadata=_metadata(_call(error, "initial_metadata")),
        trailing_metadata=trailing,
        debug_error_string=_call(error, "debug_error_string"),
    )


def _call(error: object, method: str) -> Any:
    fn = getattr(error, method, None)
    return fn() if callable(fn) else None


def _metadata(md: Any) -> grpc.aio.Metadata:
    """Metadata as gRPC's asyncio API holds it (the blocking API gives tuples)."""
    if isinstance(md, grpc.aio.Metadata):
        return md
    return grpc.aio.Metadata(*((str(k), v) for k, v in (md or ())))


def _request_id(md: grpc.aio.Metadata) -> str | None:
    value = md.get(REQUEST_ID)
    return str(value) if value else None
