"""The one error tree of sidecar. Handlers raise these; one interceptor maps them to gRPC.

    SidecarError
    ├── InvalidRequest        bad input the caller can fix        -> INVALID_ARGUMENT
    │   ├── OutOfRange        a size or count past a limit        -> OUT_OF_RANGE
    │   │   └── ContextOverflow   does not fit the model's context window
    │   └── KilledWorker      this request crashed or hung a worker (never retried)
    ├── ModelNotFound         no model by that name               -> NOT_FOUND
    ├── Unavailable           loading, restarting, shutting down  -> UNAVAILABLE
    │   └── WorkerCrashed     the worker died during the request
    ├── Overloaded            queue full                          -> RESOURCE_EXHAUSTED
    ├── FailedPrecondition    a prerequisite is missing           -> FAILED_PRECONDITION
    │   └── SchemaViolation   the model's JSON missed the schema
    ├── Unauthenticated       missing or wrong bearer token       -> UNAUTHENTICATED
    ├── Cancelled             the caller went away                -> CANCELLED
    ├── DeadlineExceeded      the caller's deadline passed        -> DEADLINE_EXCEEDED
    └── InternalError         a bug; logged with a traceback      -> INTERNAL

Errors also cross the worker pipe as (kind, message) pairs; `KINDS` rebuilds them,
so matching is by class, never by message text.
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base of every error sidecar raises on purpose."""

    kind = "internal"
    # Why the router refused, as one word a caller can act on without reading the message
    # ("sensitive": the privacy rules keep it local); sent as trailing metadata sidecar-cause.
    cause = ""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(SidecarError):
    kind = "invalid"


class OutOfRange(InvalidRequest):
    kind = "out_of_range"


class KilledWorker(InvalidRequest):
    """The request crashed or hung the worker running it, or repeats one that did.

    The request itself is the cause, so it is neither retried nor escalated.
    """

    kind = "killed_worker"


class ContextOverflow(OutOfRange):
    """Too long for this model's context window: a bigger (cloud) model may still take it."""

    kind = "context_overflow"


class ModelNotFound(SidecarError):
    kind = "not_found"


class Unavailable(SidecarError):
    kind = "unavailable"


class WorkerCrashed(Unavailable):
    kind = "worker_crashed"


class Overloaded(SidecarError):
    kind = "overloaded"


class FailedPrecondition(SidecarError):
    kind = "failed_precondition"


class SchemaViolation(FailedPrecondition):
    """The model produced JSON the schema rejects (the grammar cannot enforce every keyword)."""

    kind = "schema_violation"


class Unauthenticated(SidecarError):
    kind = "unauthenticated"


class Cancelled(SidecarError):
    kind = "cancelled"


class DeadlineExceeded(SidecarError):
    kind = "deadline"


class InternalError(SidecarError):
    kind = "internal"


class ConfigError(Exception):
    """The configuration is invalid. Not an RPC error: it stops the daemon (exit code 2)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config: {key}: {problem}")
        self.key = key
        self.problem = problem


KINDS: dict[str, type[SidecarError]] = {
    cls.kind: cls
    for cls in (
        InvalidRequest,
        OutOfRange,
        ContextOverflow,
        KilledWorker,
        ModelNotFound,
        Unavailable,
        WorkerCrashed,
        Overloaded,
        FailedPrecondition,
        SchemaViolation,
        Unauthenticated,
        Cancelled,
        DeadlineExceeded,
        InternalError,
    )
}


def from_kind(kind: str, message: str) -> SidecarError:
    """Rebuild an error that crossed a process boundary as (kind, message)."""
    return KINDS.get(kind, InternalError)(message)


class SwapRefused(FailedPrecondition):
    """The new model was not proven; the old one still serves. `stage` says where it stopped."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"swap refused at {stage}: {message}")
        self.stage = stage
        self.reason = message
