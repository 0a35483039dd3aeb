from __future__ import annotations

import grpc
import pytest

from sidecar.calls.outcome import STATUS, status_for
from sidecar.domain import errors


def all_error_classes() -> list[type[errors.SidecarError]]:
    out, todo = [], [errors.SidecarError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in out if c is not errors.SidecarError]


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
        (errors.ModelNotFound, grpc.StatusCode.NOT_FOUND),
        (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
        (errors.WorkerCrashed, grpc.StatusCode.UNAVAILABLE),
        (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
        (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
        (errors.Cancelled, grpc.StatusCode.CANCELLED),
        (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.InternalError, grpc.StatusCode.INTERNAL),
    ],
)
def test_each_domain_error_has_its_status_code(
    cls: type[errors.SidecarError], code: grpc.StatusCode
) -> None:
    assert status_for(cls("x")) == code


def test_every_error_class_is_mapped_and_keeps_its_status_across_the_worker_pipe() -> None:
    import sidecar.engine.swap
    import sidecar.gguf_check  # noqa: F401

    for cls in all_error_classes():
        assert any(base in STATUS for base in cls.__mro__), cls
        rebuilt = errors.from_kind(cls.kind, "msg")
        assert rebuilt.message == "msg"
        assert isinstance(rebuilt, errors.SidecarError)
        expected = next(STATUS[b] for b in cls.__mro__ if b in STATUS)
        assert status_for(rebuilt) == expected, cls


def test_unknown_kind_becomes_internal() -> None:
    assert isinstance(errors.from_kind("martian", "m"), errors.InternalError)
