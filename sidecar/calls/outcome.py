"""The one table from domain errors to status codes, and what a caller is told.

gRPC's status codes are the vocabulary: the gRPC front end sends them as they are, the HTTP
front end maps each to its HTTP status. So both front ends answer the same error alike.
"""

from __future__ import annotations

import logging

from grpc import StatusCode

from sidecar.domain import errors

log = logging.getLogger("sidecar.request")

STATUS: dict[type[errors.SidecarError], StatusCode] = {
    errors.InvalidRequest: StatusCode.INVALID_ARGUMENT,
    errors.OutOfRange: StatusCode.OUT_OF_RANGE,
    errors.ModelNotFound: StatusCode.NOT_FOUND,
    errors.Unavailable: StatusCode.UNAVAILABLE,
    errors.Overloaded: StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPrecondition: StatusCode.FAILED_PRECONDITION,
    errors.Unauthenticated: StatusCode.UNAUTHENTICATED,
    errors.Cancelled: StatusCode.CANCELLED,
    errors.DeadlineExceeded: StatusCode.DEADLINE_EXCEEDED,
    errors.InternalError: StatusCode.INTERNAL,
}


def status_for(error: errors.SidecarError) -> StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return StatusCode.INTERNAL


def told(error: BaseException, rid: str, method: str) -> str:
    """What the caller is told about `error`. A bad request gets its message, which says what
    to fix. An internal error (a bug, or a worker's unexpected exception with its traceback)
    is logged in full under the request id, and the caller gets only that id: tracebacks,
    paths and library internals are for the daemon's owner, not for every client."""
    if isinstance(error, errors.SidecarError):
        if status_for(error) is not StatusCode.INTERNAL:
            return error.message
        log.error("request %s %s failed: %s", rid, method, error.message)
    else:
        log.error("request %s %s failed", rid, method, exc_info=error)
    return f"internal error (request {rid}); the daemon log has the details"
