"""The Python client's surface: typed methods, the same on `Client` and `AsyncClient`, one
per RPC; the exception tree; the retry policy."""

from __future__ import annotations

import inspect
import pickle
import random
import re

import grpc
import pytest
from grpc import StatusCode

import sidecar.client as client_pkg
from sidecar.client import (
    AsyncClient,
    Client,
    FailedPreconditionError,
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    ResourceExhaustedError,
    SidecarError,
    UnavailableError,
    chat_request,
    classify_request,
    embed_request,
    extract_request,
    generate_request,
)
from sidecar.client.errors import ERRORS, from_rpc
from sidecar.client.retry import Retry
from sidecar.v1 import inference_pb2 as pb


def public_methods(cls: type) -> dict[str, object]:
    return {
        name: fn
        for name, fn in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


def test_sync_and_async_clients_have_the_same_methods_and_signatures() -> None:
    sync, aio = public_methods(Client), public_methods(AsyncClient)
    assert set(sync) == set(aio)
    assert len(sync) >= 20
    for name in sync:
        a, b = inspect.signature(sync[name]), inspect.signature(aio[name])  # type: ignore[arg-type]
        assert list(a.parameters.values()) == list(b.parameters.values()), name
        # The same reply type; a stream is a Stream on one side, an AsyncStream on the other.
        assert str(a.return_annotation) == str(b.return_annotation).replace(
            "AsyncStream[", "Stream["
        ), name
        streams = "Stream[" in str(a.return_annotation)
        assert inspect.iscoroutinefunction(aio[name]) is not streams, name
        assert not inspect.iscoroutinefunction(sync[name]), name
    assert inspect.signature(Client.__init__) == inspect.signature(AsyncClient.__init__)


def test_every_method_names_and_types_each_parameter_and_says_what_it_does() -> None:
    for cls in (Client, AsyncClient):
        for name, fn in {**public_methods(cls), "__init__": cls.__init__}.items():
            sig = inspect.signature(fn)  # type: ignore[arg-type]
            for p in list(sig.parameters.values())[1:]:
                assert p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL), (
                    f"{cls.__name__}.{name}(*{p.name})"
                )
                assert p.annotation is not p.empty, f"{cls.__name__}.{name}: {p.name} has no type"
            assert sig.return_annotation is not sig.empty, f"{cls.__name__}.{name}"
            doc = inspect.getdoc(fn) if name != "__init__" else inspect.getdoc(cls)
            assert doc and len(doc) > 20, f"{cls.__name__}.{name} has no docstring"


# The streams refuse low priority (a stream is someone waiting), so they do not offer it.
STREAMS_LEAVE_OUT = {"low_priority"}


@pytest.mark.parametrize(
    ("method", "builder", "left_out"),
    [
        ("generate", generate_request, set()),
        ("generate_stream", generate_request, STREAMS_LEAVE_OUT),
        ("chat", chat_request, set()),
        ("chat_stream", chat_request, STREAMS_LEAVE_OUT),
        ("classify", classify_request, set()),
        ("extract", extract_request, set()),
        ("embed", embed_request, set()),
    ],
)
def test_each_inference_method_takes_every_argument_of_its_request(
    method: str, builder: object, left_out: set[str]
) -> None:
    params = inspect.signature(builder).parameters.values()  # type: ignore[arg-type]
    want = [p for p in params if p.name not in left_out]
    got = list(inspect.signature(getattr(Client, method)).parameters.values())
    assert got[0].name == "self" and got[-1].name == "timeout"
    assert got[1:-1] == want


@pytest.mark.parametrize("client", [Client, AsyncClient])
@pytest.mark.parametrize("method", ["check_update", "apply_update", "apply_update_stream"])
def test_each_update_method_takes_every_field_of_its_request(client: type, method: str) -> None:
    # As the CLI builds it: a field left out (ignore_rollout) is an option only the CLI has.
    params = inspect.signature(getattr(client, method)).parameters
    assert set(pb.UpdateRequest.DESCRIPTOR.fields_by_name) <= set(params)


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def test_every_rpc_of_the_api_has_a_client_method() -> None:
    """A new RPC in the proto fails this until both clients can call it (streams may be
    `NAME_stream` beside a `NAME` that waits for the outcome)."""
    methods = public_methods(Client)
    for service in ("Inference", "Admin"):
        for rpc in pb.DESCRIPTOR.services_by_name[service].methods:
            name = snake(rpc.name)
            assert name in methods or f"{name}_stream" in methods, f"{service}.{rpc.name}"


# ---------------------------------------------------------------- errors


def grpc_error(code: StatusCode, details: str, request_id: str | None = None) -> grpc.RpcError:
    trailing = grpc.aio.Metadata(*([("sidecar-request-id", request_id)] if request_id else []))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


@pytest.mark.parametrize(
    ("code", "cls", "reason"),
    [
        (StatusCode.INVALID_ARGUMENT, InvalidRequestError, "invalid_argument"),
        (StatusCode.NOT_FOUND, NotFoundError, "not_found"),
        (StatusCode.UNAVAILABLE, UnavailableError, "unavailable"),
        (StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError, "resource_exhausted"),
        (StatusCode.FAILED_PRECONDITION, FailedPreconditionError, "failed_precondition"),
        (StatusCode.UNAUTHENTICATED, client_pkg.AuthenticationError, "unauthenticated"),
        (StatusCode.DEADLINE_EXCEEDED, client_pkg.DeadlineExceededError, "deadline_exceeded"),
        (StatusCode.CANCELLED, client_pkg.CallCancelledError, "cancelled"),
        (StatusCode.INTERNAL, InternalServerError, "internal"),
        (StatusCode.UNKNOWN, InternalServerError, "unknown"),
    ],
)
def test_each_status_code_raises_its_class_with_code_reason_message_and_request_id(
    code: StatusCode, cls: type[SidecarError], reason: str
) -> None:
    e = from_rpc(grpc_error(code, "what went wrong", "abc123"))
    assert type(e) is cls
    assert (e.status_code, e.reason, e.message, e.request_id) == (
        code,
        reason,
        "what went wrong",
        "abc123",
    )
    # Still what gRPC raises, so existing `except grpc.RpcError` / AioRpcError code works.
    assert isinstance(e, grpc.RpcError) and isinstance(e, grpc.aio.AioRpcError)
    assert e.code() is code and e.details() == "what went wrong"
    assert str(e) == f"{reason}: what went wrong (request abc123)"
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is cls and again.request_id == "abc123" and again.message == e.message


def test_a_call_that_never_reached_the_daemon_has_no_request_id() -> None:
    e = from_rpc(grpc_error(StatusCode.UNAVAILABLE, "failed to connect"))
    assert isinstance(e, UnavailableError) and e.request_id is None
    assert str(e) == "unavailable: failed to connect"


def test_the_table_maps_every_code_the_daemon_sends() -> None:
    from sidecar.calls.outcome import STATUS

    for code in STATUS.values():
        assert code is StatusCode.INTERNAL or code in ERRORS, code


# ---------------------------------------------------------------- retries


def test_only_unavailable_and_resource_exhausted_are_retried_and_only_retries_times() -> None:
    r = Retry(retries=3, backoff_s=0.1, backoff_max_s=10)
    for code in StatusCode:
        retried = r.delay(0, code) is not None
        assert retried is (code in (StatusCode.UNAVAILABLE, StatusCode.RESOURCE_EXHAUSTED)), code
    assert [r.delay(n, StatusCode.UNAVAILABLE) is not None for n in range(5)] == [True] * 3 + [
        False
    ] * 2
    assert Retry().delay(0, StatusCode.UNAVAILABLE) is None  # the default: never


def test_backoff_doubles_up_to_its_cap_with_jitter_between_half_and_all() -> None:
    r = Retry(retries=10, backoff_s=0.1, backoff_max_s=1.0, rng=random.Random(7))
    for attempt, nominal in enumerate([0.1, 0.2, 0.4, 0.8, 1.0, 1.0]):
        waits = [r.delay(attempt, StatusCode.RESOURCE_EXHAUSTED) for _ in range(200)]
        assert all(w is not None and nominal / 2 <= w <= nominal for w in waits), attempt
        assert len(set(waits)) > 100  # jittered: clients refused together do not return together


@pytest.mark.parametrize(
    "kw", [{"retries": -1}, {"backoff_s": 0}, {"backoff_s": 2, "backoff_max_s": 1}]
)
def test_a_bad_retry_setting_is_refused_with_a_clear_error(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"retries|backoff"):
        Client("/nonexistent.sock", **kw)  # type: ignore[arg-type]


def test_bad_arguments_are_refused_before_anything_is_sent() -> None:
    with pytest.raises(ValueError, match="routing must be AUTO, LOCAL_ONLY, CLOUD_ONLY"):
        generate_request("x", routing="LOCAL")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="list of strings"):
        embed_request("one text")
    assert generate_request("x", routing="local_only").routing == pb.ROUTING_LOCAL_ONLY


class Refusing:
    """A stand-in for a gRPC stream call: yields `items`, then fails with `code`."""

    def __init__(self, items: list[str], code: StatusCode) -> None:
        self.items, self.code = list(items), code

    def __next__(self) -> str:
        if self.items:
            return self.items.pop(0)
        raise grpc_error(self.code, "refused")

    async def read(self) -> str:
        return self.__next__()


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_a_stream_is_retried_before_its_first_message_and_never_after(
    asynchronous: bool,
) -> None:
    from sidecar.client import AsyncStream, Stream

    async def drain(calls: list[Refusing]) -> tuple[list[str], int]:
        started = []

        def start() -> Refusing:
            started.append(1)
            return calls[len(started) - 1]

        retry = Retry(retries=5, backoff_s=0.001, backoff_max_s=0.001)
        got: list[str] = []
        with pytest.raises(UnavailableError):
            if asynchronous:
                async for item in AsyncStream[str](start, retry):
                    got.append(item)
            else:
                for item in Stream[str](start, retry):
                    got.append(item)
        return got, len(started)

    # Refused twice before anything came, then a message, then a failure: not made again.
    calls = [Refusing([], StatusCode.UNAVAILABLE), Refusing([], StatusCode.UNAVAILABLE),
             Refusing(["a"], StatusCode.UNAVAILABLE), Refusing(["b"], StatusCode.OK)]  # fmt: skip
    assert await drain(calls) == (["a"], 3)
