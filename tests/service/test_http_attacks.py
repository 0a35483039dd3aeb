"""Attacks on the front ends (gRPC and the OpenAI-compatible HTTP API), kept as tests.

Each reproduces what an outside attacker did to the daemon (issue 12) and checks that
the request is refused with a status saying what to fix, before it reaches a worker,
and that the daemon keeps serving: message floods, lone surrogates, deep nesting,
unexpected worker exceptions, slow-loris connections, and `max_tokens = 0`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import grpc
import httpx2 as httpx
import pytest

from sidecar.calls.outcome import told
from sidecar.domain.errors import InternalError
from sidecar.domain.types import GenerateTask, TokenEvent
from sidecar.engine.fake import FakeSlot
from sidecar.openai_api import listener
from sidecar.v1 import inference_pb2 as pb
from sidecar.validate import MAX_CHAT_MESSAGES
from sidecar.worker.runner import LlamaRunner

pytestmark = pytest.mark.asyncio

TOKEN = "attack-token-123"
OK_CHAT = {"model": "", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def code_of(awaitable: object) -> tuple[grpc.StatusCode, str, Any]:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await awaitable  # type: ignore[misc]
    return e.value.code(), e.value.details() or "", e.value.trailing_metadata()


def http_client(short_dir: Path) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(uds=str(short_dir / "h.sock"))
    return httpx.AsyncClient(transport=transport, base_url="http://sidecar", timeout=30)


def jobs_run(served: Any) -> int:
    """How many jobs reached any worker (slot) of the default model."""
    pool = served.running.local.pools["default"]
    return sum(s.info.requests for s in pool._slots)


@pytest.fixture
async def fake_api(serve, tiny_model: Path, short_dir: Path):  # type: ignore[no-untyped-def]
    served = await serve(tiny_model, http={"socket": str(short_dir / "h.sock")})
    async with http_client(short_dir) as http:
        yield served, http


@pytest.fixture
async def real_api(serve, tiny_model: Path, short_dir: Path):  # type: ignore[no-untyped-def]
    """Real llama.cpp (tiny GGUF) in thread slots, HTTP on a Unix socket."""
    served = await serve(
        tiny_model, slot_kind="thread", workers=1, http={"socket": str(short_dir / "h.sock")}
    )
    async with http_client(short_dir) as http:
        yield served, http


# ---------------------------------------------------------------- message floods


async def test_a_chat_of_100k_messages_is_refused_before_any_worker_on_both_front_ends(
    fake_api,
) -> None:  # type: ignore[no-untyped-def]
    served, http = fake_api
    flood = [{"role": "user", "content": "x"} for _ in range(100_000)]
    body = json.dumps({"model": "", "messages": flood}).encode()
    assert len(body) > 1_500_000  # the 1.8 MB request of the report
    started = time.perf_counter()
    r = await http.post("/v1/chat/completions", content=body)
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "messages" in message and str(MAX_CHAT_MESSAGES) in message
    assert time.perf_counter() - started < 20
    # The same flood over gRPC, unary and streamed.
    messages = [pb.ChatMessage(role="user", content="x") for _ in range(100_000)]
    request = pb.ChatRequest(messages=messages)
    inference = served.client.inference
    for rpc in (inference.Chat, None):
        if rpc is None:
            call = inference.ChatStream(request)
            code, details, _ = await code_of(call.read())
        else:
            code, details, _ = await code_of(rpc(request))
        assert code == grpc.StatusCode.OUT_OF_RANGE
        assert "messages" in details and str(MAX_CHAT_MESSAGES) in details
    # The Extract path of HTTP chat (response_format) is bounded too.
    r = await http.post(
        "/v1/chat/completions",
        json={
            "messages": flood[: MAX_CHAT_MESSAGES + 1],
            "response_format": {"type": "json_object"},
        },
    )
    assert r.status_code == 400 and str(MAX_CHAT_MESSAGES) in r.json()["error"]["message"]
    assert jobs_run(served) == 0, "a refused request reached a worker"
    r = await http.post("/v1/chat/completions", json=OK_CHAT)
    assert r.status_code == 200


async def test_a_chat_at_the_message_limit_is_answered_fast_by_real_llama(real_api) -> None:  # type: ignore[no-untyped-def]
    """The limit is low enough that rendering and tokenizing stay far below a ping interval:
    100k messages took llama.cpp's special-token tokenizer minutes (quadratic), the limit
    takes well under a second."""
    served, http = real_api
    messages = [{"role": "user", "content": "x"} for _ in range(MAX_CHAT_MESSAGES)]
    started = time.perf_counter()
    r = await http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
    assert r.status_code in (200, 400), r.text  # answered, or too long for the context
    assert time.perf_counter() - started < 20
    assert (await served.client.chat([("user", "still fine")], max_tokens=1)).text is not None


# ---------------------------------------------------------------- lone surrogates


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
            "messages[0].content",
        ),
        ("/v1/completions", b'{"prompt": "\\udfff", "max_tokens": 1}', "prompt"),
        ("/v1/embeddings", b'{"input": ["ok", "\\ud83d"]}', "input[1]"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "hi"}], "response_format": '
            b'{"type": "json_schema", "json_schema": {"schema": {"type": "object", '
            b'"properties": {"\\ud800": {"type": "string"}}}}}}',
            "response_format.json_schema.schema.properties",
        ),
    ],
)
async def test_a_lone_surrogate_is_400_naming_the_field_not_a_500_with_a_traceback(
    real_api, route: str, body: bytes, field: str
) -> None:  # type: ignore[no-untyped-def]
    served, http = real_api
    r = await http.post(route, content=body)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert field in message and "surrogate" in message
    assert "Traceback" not in message
    assert jobs_run(served) == 0
    # A properly paired surrogate (an emoji) is text like any other.
    r = await http.post(
        "/v1/completions", content=b'{"prompt": "smile \\ud83d\\ude00", "max_tokens": 1}'
    )
    assert r.status_code == 200, r.text


async def test_a_surrogate_encoded_as_raw_utf8_bytes_is_400_too(real_api) -> None:  # type: ignore[no-untyped-def]
    served, http = real_api
    body = b'{"prompt": "a\xed\xa0\x80b", "max_tokens": 1}'  # no \u escape to spot
    r = await http.post("/v1/completions", content=body)
    assert r.status_code == 400, r.text
    assert "UTF-8" in r.json()["error"]["message"]
    assert jobs_run(served) == 0


async def test_grpc_refuses_surrogates_encoded_as_utf8_bytes(serve, tiny_model: Path) -> None:
    s = await serve(tiny_model)
    raw = s.client.channel.unary_unary("/sidecar.v1.Inference/Generate")
    # field 2 (prompt), length 3: U+D800 as (CESU) UTF-8 bytes, which UTF-8 forbids
    code, details, _ = await code_of(raw(b"\x12\x03\xed\xa0\x80"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in details
    assert (await s.client.generate("ok", max_tokens=1)).text == "ok "


# ---------------------------------------------------------------- internal errors


@pytest.fixture
def broken_runner(monkeypatch: pytest.MonkeyPatch) -> str:
    """The real runner, failing with an unexpected exception after one streamed token."""
    secret = "SECRET-DETAIL /home/someone/model.py line 42"

    def run(self: LlamaRunner, task: Any, emit: Any, should_stop: Any) -> Any:
        if emit is not None:
            emit(TokenEvent("first"))
        raise RuntimeError(secret)

    monkeypatch.setattr(LlamaRunner, "run", run)
    return secret


async def test_unexpected_worker_errors_show_only_a_request_id_on_grpc(
    real_api, broken_runner: str, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    served, _http = real_api
    caplog.set_level(logging.ERROR)
    code, details, trailers = await code_of(served.client.generate("hi", max_tokens=2))
    assert code == grpc.StatusCode.INTERNAL
    rid = dict(trailers or ())["sidecar-request-id"]
    assert details == f"internal error (request {rid}); the daemon log has the details"
    assert broken_runner in caplog.text and rid in caplog.text
    call = served.client.inference.ChatStream(
        pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="x")])
    )
    code, details, _ = await code_of(_drain(call))
    assert code == grpc.StatusCode.INTERNAL
    assert broken_runner not in details and "internal error (request " in details


async def _drain(call: Any) -> None:
    while await call.read() is not grpc.aio.EOF:
        pass


async def test_unexpected_worker_errors_show_only_a_request_id_on_http(
    real_api, broken_runner: str, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    _served, http = real_api
    caplog.set_level(logging.ERROR)
    r = await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 500
    rid = r.headers["x-request-id"]
    assert r.json()["error"]["message"] == (
        f"internal error (request {rid}); the daemon log has the details"
    )
    assert broken_runner in caplog.text and rid in caplog.text
    # Mid-stream (headers already sent): the error event carries no detail either.
    r = await http.post("/v1/chat/completions", json={**OK_CHAT, "stream": True})
    assert r.status_code == 200
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    error = json.loads(events[-1])["error"]
    assert broken_runner not in error["message"]
    assert error["message"].startswith("internal error (request ")


async def test_a_worker_process_traceback_reaches_the_log_not_the_caller(
    serve, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The spawned worker sends an unexpected exception's traceback over its pipe; the front
    ends' one mapping (`told`) logs it and tells the caller only the request id."""
    served = await serve(tiny_model, slot_kind="process", workers=1)
    engine = served.running.local
    with pytest.raises(InternalError) as e:  # a lone surrogate the front ends now refuse
        await engine.run("", GenerateTask(prompt="\ud800", max_tokens=1), "test")
    assert "Traceback" in e.value.message and "UnicodeEncodeError" in e.value.message
    caplog.set_level(logging.ERROR)
    said = told(e.value, "abc123", "/sidecar.v1.Inference/Generate")
    assert said == "internal error (request abc123); the daemon log has the details"
    assert "UnicodeEncodeError" in caplog.text and "abc123" in caplog.text
    # ...and the worker is still there for the next request.
    assert (await served.client.generate("fine", max_tokens=1)).text is not None


# ---------------------------------------------------------------- deep nesting


async def test_a_body_nested_100k_deep_is_400_not_a_recursion_error(fake_api) -> None:  # type: ignore[no-untyped-def]
    served, http = fake_api
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = await http.post("/v1/chat/completions", content=deep)
    assert r.status_code == 400, r.text
    assert "nested" in r.json()["error"]["message"]
    # Deep enough to pass the JSON parser but past the bound (it would reach the schema
    # tools and json.dumps, which recurse).
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(400):
        schema = {"type": "array", "items": schema}
    body = {
        **OK_CHAT,
        "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
    }
    r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert "nested" in r.json()["error"]["message"]
    assert jobs_run(served) == 0
    r = await http.post("/v1/chat/completions", json=OK_CHAT)
    assert r.status_code == 200


# ---------------------------------------------------------------- slow loris


@pytest.fixture
async def tcp_api(serve, tiny_model: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(listener, "HEADER_TIMEOUT_S", 0.6)
    monkeypatch.setattr(listener, "BODY_TIMEOUT_S", 0.8)
    port = free_port()
    served = await serve(tiny_model, http={"port": port, "token": TOKEN})
    yield served, port


def auth() -> dict[str, str]:
    return {"authorization": f"Bearer {TOKEN}"}


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sent until it closed the connection; fails if it did not."""
    data = await asyncio.wait_for(reader.read(), seconds)
    return data


async def test_slow_headers_and_endless_bodies_are_cut_while_normal_requests_work(tcp_api) -> None:  # type: ignore[no-untyped-def]
    _served, port = tcp_api
    # 1. Headers trickled one byte at a time, never finished.
    r1, w1 = await asyncio.open_connection("127.0.0.1", port)
    # 2. A connection that sends nothing at all.
    r2, w2 = await asyncio.open_connection("127.0.0.1", port)
    # 3. Full headers, then a chunked body that never ends.
    r3, w3 = await asyncio.open_connection("127.0.0.1", port)
    w3.write(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
        + f"authorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\n\r\n".encode()
        + b'5\r\n{"pro\r\n'
    )
    started = time.monotonic()

    async def trickle() -> None:
        for byte in b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-slow: " + b"a" * 1000:
            if w1.is_closing():
                return
            w1.write(bytes([byte]))
            await asyncio.sleep(0.05)

    async def trickle_body() -> None:
        for _ in range(1000):
            if w3.is_closing():
                return
            w3.write(b"1\r\na\r\n")
            await asyncio.sleep(0.05)

    dripping = [asyncio.ensure_future(trickle()), asyncio.ensure_future(trickle_body())]
    try:
        # Meanwhile normal requests are served, on fresh and kept-alive connections.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=auth()) as h:
            for _ in range(3):
                r = await h.post("/v1/completions", json={"prompt": "fine", "max_tokens": 1})
                assert r.status_code == 200
        # Without the deadlines, all three stay open for as long as the client likes.
        got1 = await closed_within(r1, 5)
        got2 = await closed_within(r2, 5)
        got3 = await closed_within(r3, 5)
        assert time.monotonic() - started < 5
    finally:
        for t in dripping:
            t.cancel()
        for w in (w1, w2, w3):
            w.close()
    assert got2 == b""  # nothing was asked: nothing is answered
    assert got1.startswith(b"HTTP/1.1 408") and b"header" in got1
    assert got3.startswith(b"HTTP/1.1 408") and b"body" in got3
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=auth()) as http:
        r = await http.post("/v1/completions", json={"prompt": "after", "max_tokens": 1})
        assert r.status_code == 200


async def test_a_response_slower_than_the_timeouts_is_not_cut(
    tcp_api, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """The timeouts bound what the client sends, never how long the answer takes."""
    _served, port = tcp_api
    monkeypatch.setattr(FakeSlot, "token_delay_s", 0.1)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=auth()) as http:
        started = time.monotonic()
        r = await http.post("/v1/completions", json={"prompt": "slow", "max_tokens": 15})
        assert r.status_code == 200 and time.monotonic() - started > 1.2
        chunks = []
        async with http.stream(
            "POST", "/v1/completions", json={"prompt": "slow", "max_tokens": 15, "stream": True}
        ) as s:
            async for line in s.aiter_lines():
                chunks.append(line)
        assert "data: [DONE]" in chunks
        # The kept-alive connection still works after the long responses.
        r = await http.post("/v1/completions", json={"prompt": "again", "max_tokens": 1})
        assert r.status_code == 200


# ---------------------------------------------------------------- max_tokens = 0


async def test_max_tokens_zero_means_the_server_default_on_both_front_ends(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    served = await serve(
        tiny_model, server={"default_max_tokens": 3}, http={"socket": str(short_dir / "h.sock")}
    )
    reply = await served.client.generate("a b", max_tokens=0)
    assert reply.usage.completion_tokens == 3
    reply = await served.client.chat([("user", "a b")], max_tokens=0)
    assert reply.usage.completion_tokens == 3
    code, details, _ = await code_of(served.client.generate("a b", max_tokens=-1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in details
    async with http_client(short_dir) as http:
        for route, body in (
            ("/v1/completions", {"prompt": "a b", "max_tokens": 0}),
            ("/v1/chat/completions", {**OK_CHAT, "max_tokens": 0}),
            ("/v1/chat/completions", {**OK_CHAT, "max_completion_tokens": 0}),
        ):
            r = await http.post(route, json=body)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 3
        r = await http.post("/v1/completions", json={"prompt": "a b", "max_tokens": -2})
        assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
