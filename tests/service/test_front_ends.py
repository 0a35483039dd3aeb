"""Both front ends stand on the Engine seam alone, and treat callers alike.

A recording engine (anything with the seam's shape) under a real gRPC server on TCP and
the real HTTP app: the same bearer token is accepted by both, gives the same fair-queue
identity on both, and a wrong one is refused by both before the engine is reached.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx2 as httpx
import pytest

from sidecar.calls.accounting import RequestLog
from sidecar.domain.seam import DEFAULT_ROUTE, Engine
from sidecar.domain.status import PoolStatus
from sidecar.domain.types import (
    Generation,
    ModelRef,
    Result,
    RouteRequest,
    StreamableTask,
    Task,
    TokenConfidence,
    TokenEvent,
    Usage,
)
from sidecar.openai_api.app import OpenAIApp
from sidecar.server.interceptor import RequestInterceptor
from sidecar.server.servicer import InferenceServicer
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc as pb_grpc

TOKEN = "s3cret"
REF = ModelRef("m", "0123456789ab")


class RecordingEngine:
    """Answers every task with its prompt, and remembers who asked and how."""

    default_model = "m"
    ready = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, RouteRequest]] = []

    async def start(self) -> None: ...
    async def close(self) -> None: ...

    def ref(self, model: str) -> ModelRef:
        return REF

    def check(self, model: str, task: Task) -> None: ...

    async def run(
        self,
        model: str,
        task: Task,
        caller: str,
        *,
        route: RouteRequest = DEFAULT_ROUTE,
        background: bool = False,
    ) -> Result:
        self.calls.append((caller, route))
        return Generation("ok", "stop", Usage(1, 1), TokenConfidence(0.0, 0.0), REF)

    async def stream(
        self, model: str, task: StreamableTask, caller: str, *, route: RouteRequest = DEFAULT_ROUTE
    ) -> AsyncIterator[TokenEvent | Generation]:
        self.calls.append((caller, route))
        yield TokenEvent("ok")
        yield Generation("ok", "stop", Usage(1, 1), TokenConfidence(0.0, 0.0), REF)

    def status(self) -> list[tuple[PoolStatus, bool]]:
        return []


class Samples:
    def request(self, rpc: str, model: str, status: str, seconds: float) -> None: ...


@pytest.fixture
async def front_ends() -> AsyncIterator[tuple[RecordingEngine, Any, httpx.AsyncClient]]:
    engine = RecordingEngine()
    seam: Engine = engine  # the front ends need nothing more than the seam
    requests = RequestLog(Samples(), "m", frozenset({"m"}))
    server = grpc.aio.server(interceptors=[RequestInterceptor(requests, TOKEN)])
    pb_grpc.add_InferenceServicer_to_server(InferenceServicer(seam), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    app = OpenAIApp(seam, requests, TOKEN, 1 << 20).asgi()
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sidecar")
    yield engine, pb_grpc.InferenceStub(channel), http
    await http.aclose()
    await channel.close()
    await server.stop(0)


def bearer(token: str) -> str:
    return f"Bearer {token}"


async def test_one_token_is_one_caller_on_grpc_and_http(front_ends) -> None:  # type: ignore[no-untyped-def]
    engine, stub, http = front_ends
    await stub.Generate(
        pb.GenerateRequest(prompt="x"), metadata=(("authorization", bearer(TOKEN)),)
    )
    r = await http.post(
        "/v1/completions",
        json={"model": "m", "prompt": "x"},
        headers={"authorization": bearer(TOKEN)},
    )
    assert r.status_code == 200, r.text
    (grpc_caller, _), (http_caller, _) = engine.calls
    assert grpc_caller == http_caller and grpc_caller.startswith("token:")
    assert TOKEN not in grpc_caller  # the key is logged: the token must not be


async def test_a_wrong_token_is_refused_by_both_before_the_engine(front_ends) -> None:  # type: ignore[no-untyped-def]
    engine, stub, http = front_ends
    for sent in ((), (("authorization", bearer("wrong")),), (("authorization", TOKEN),)):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Generate(pb.GenerateRequest(prompt="x"), metadata=sent)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "Bearer <server.tcp_token>" in (e.value.details() or "")
        headers = dict(sent)
        r = await http.post("/v1/completions", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["type"] == "authentication_error"
    assert engine.calls == []


async def test_routing_reaches_the_engine_from_both(front_ends) -> None:  # type: ignore[no-untyped-def]
    engine, stub, http = front_ends
    auth = (("authorization", bearer(TOKEN)),)
    await stub.Generate(
        pb.GenerateRequest(prompt="x", routing=pb.ROUTING_LOCAL_ONLY, sensitive=True),
        metadata=auth,
    )
    chunks = [c async for c in stub.GenerateStream(pb.GenerateRequest(prompt="x"), metadata=auth)]
    assert chunks[-1].summary.text == "ok"
    body = {"prompt": "x", "sidecar_routing": "CLOUD_ONLY", "sidecar_sensitive": True}
    r = await http.post("/v1/completions", json=body, headers=dict(auth))
    assert r.status_code == 200, r.text
    assert [route for _, route in engine.calls] == [
        RouteRequest("LOCAL_ONLY", True),
        RouteRequest(),
        RouteRequest("CLOUD_ONLY", True),
    ]


async def test_each_call_is_judged_by_its_own_metadata(front_ends) -> None:  # type: ignore[no-untyped-def]
    # The interceptor wraps a method's handler once and reuses it: nothing of one call
    # (its token) may stick to the next call of the same method.
    engine, stub, _ = front_ends
    for token, accepted in (("wrong", False), (TOKEN, True), ("wrong", False), (TOKEN, True)):
        md = (("authorization", bearer(token)),)
        request = pb.GenerateRequest(prompt="x")
        if accepted:
            assert (await stub.Generate(request, metadata=md)).text == "ok"
            chunks = [c async for c in stub.GenerateStream(request, metadata=md)]
            assert chunks[-1].summary.text == "ok"
            continue
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Generate(request, metadata=md)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in stub.GenerateStream(request, metadata=md):
                pass
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(engine.calls) == 4


async def test_every_call_is_counted_once_with_its_status(front_ends, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # The sample (and log line) is written after the reply, on the loop's next turn: still
    # exactly one per call, with the call's own status.
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(
        Samples, "request", lambda _s, rpc, _m, status, _t: seen.append((rpc, status))
    )
    _, stub, _ = front_ends
    md = (("authorization", bearer(TOKEN)),)
    await stub.Generate(pb.GenerateRequest(prompt="x"), metadata=md)
    [c async for c in stub.GenerateStream(pb.GenerateRequest(prompt="x"), metadata=md)]
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Generate(pb.GenerateRequest(prompt="x"))
    await asyncio.sleep(0)
    assert seen == [("Generate", "OK"), ("GenerateStream", "OK"), ("Generate", "UNAUTHENTICATED")]
