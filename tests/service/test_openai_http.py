"""The OpenAI-compatible HTTP API, called by the official `openai` SDK on a real socket.

The daemon is real (uvicorn on the daemon's loop, the same engine as gRPC); the model is
the tiny GGUF on real llama.cpp (thread slots) where answers matter, the fake slot where
timing must be controlled (queues, cancellation).
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import httpx2 as httpx
import numpy as np
import openai
import pytest
from openai_client import unix_client  # type: ignore[import-not-found]

from sidecar.engine.fake import FakeSlot

pytestmark = pytest.mark.asyncio

TOKEN = "test-token-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_chat_completion_matches_grpc_chat_byte_for_byte(api) -> None:  # type: ignore[no-untyped-def]
    served, client = api
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    reply = await client.chat.completions.create(model="default", messages=messages, max_tokens=12)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model == "default"
    grpc_reply = await served.client.chat(messages, max_tokens=12)
    assert choice.message.content == grpc_reply.text
    # Which stored version answered: the same stamp gRPC returns.
    assert reply.system_fingerprint == f"default@{grpc_reply.model.version}"
    extra = reply.model_extra or {}
    assert extra["sidecar"]["served_by"] == "local"
    assert extra["sidecar"]["model_version"] == grpc_reply.model.version


async def test_streamed_chat_concatenates_to_the_unary_answer(api) -> None:  # type: ignore[no-untyped-def]
    _served, client = api
    messages = [{"role": "user", "content": "Count"}]
    whole = await client.chat.completions.create(model="", messages=messages, max_tokens=10)
    stream = await client.chat.completions.create(
        model="",
        messages=messages,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage, roles = [], None, None, []
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                pieces.append(c.delta.content)
            finish = c.finish_reason or finish
    assert roles == ["assistant"]
    assert len(pieces) >= 2, "streamed as one piece"
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


async def test_completions_unary_and_streamed_match_grpc_generate(api) -> None:  # type: ignore[no-untyped-def]
    served, client = api
    reply = await client.completions.create(model="default", prompt="The sky is", max_tokens=8)
    grpc_reply = await served.client.generate("The sky is", max_tokens=8)
    assert reply.choices[0].text == grpc_reply.text
    assert reply.object == "text_completion"
    stream = await client.completions.create(
        model="default", prompt="The sky is", max_tokens=8, stream=True
    )
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == grpc_reply.text


async def test_embeddings_float_and_base64_agree_and_are_unit_length(api) -> None:  # type: ignore[no-untyped-def]
    _served, client = api
    # The SDK asks for base64 by default and decodes it itself.
    b64 = await client.embeddings.create(model="default", input=["a cat", "a dog"])
    flt = await client.embeddings.create(
        model="default", input=["a cat", "a dog"], encoding_format="float"
    )
    assert [d.index for d in b64.data] == [0, 1]
    a, b = np.array(b64.data[0].embedding), np.array(flt.data[0].embedding)
    assert a.shape == b.shape and a.shape[0] > 0
    assert np.allclose(a, b, atol=1e-6)
    assert abs(np.linalg.norm(a) - 1.0) < 1e-4
    assert b64.usage.prompt_tokens > 0
    one = await client.embeddings.create(model="default", input="a cat", encoding_format="float")
    assert np.allclose(one.data[0].embedding, flt.data[0].embedding, atol=1e-6)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        await client.embeddings.create(model="default", input="x", dimensions=3)


async def test_models_lists_the_served_models(api) -> None:  # type: ignore[no-untyped-def]
    _served, client = api
    page = await client.models.list()
    assert [m.id for m in page.data] == ["default"]
    assert (await client.models.retrieve("default")).id == "default"
    with pytest.raises(openai.NotFoundError, match="no model named 'gpt-4o'"):
        await client.models.retrieve("gpt-4o")


async def test_response_format_json_schema_runs_constrained_extract(api) -> None:  # type: ignore[no-untyped-def]
    served, client = api
    schema = {
        "type": "object",
        "properties": {"flag": {"type": "boolean"}},
        "required": ["flag"],
        "additionalProperties": False,
    }
    reply = await client.chat.completions.create(
        model="default",
        messages=[
            {"role": "system", "content": "Fill the form."},
            {"role": "user", "content": "yes"},
        ],
        response_format={"type": "json_schema", "json_schema": {"name": "f", "schema": schema}},
    )
    data = json.loads(reply.choices[0].message.content or "")
    assert isinstance(data, dict) and isinstance(data["flag"], bool)
    grpc_reply = await served.client.extract("yes", schema, instruction="Fill the form.")
    assert reply.choices[0].message.content == grpc_reply.json
    # Streaming callers get the validated JSON too.
    stream = await client.chat.completions.create(
        model="default",
        messages=[
            {"role": "system", "content": "Fill the form."},
            {"role": "user", "content": "yes"},
        ],
        response_format={"type": "json_schema", "json_schema": {"name": "f", "schema": schema}},
        stream=True,
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == grpc_reply.json


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 2}, "'n' is not supported"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool calling"),
        ({"logprobs": True, "top_logprobs": 21}, "between 0 and 20"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"temperature": 9}, "temperature"),
        ({"max_tokens": -1}, "max_tokens must be at least 1"),  # 0 = the default
        ({"messages": []}, "'messages' is required"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "tool calling is not supported"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            "reads text only",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "schema",
        ),
        ({"stream_options": {"include_usage": True}}, "only allowed with 'stream': true"),
    ],
)
async def test_bad_chat_requests_get_400_in_the_sdk_error_shape(api, kwargs, match) -> None:  # type: ignore[no-untyped-def]
    _served, client = api
    args: dict[str, Any] = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
    args |= kwargs
    with pytest.raises(openai.BadRequestError, match=match) as info:
        await client.chat.completions.create(**args)
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "invalid_request_error"
    assert info.value.response.headers["x-request-id"]
    # ...and the daemon keeps serving.
    ok = await client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    assert ok.choices[0].finish_reason in ("stop", "length")


async def test_unknown_model_is_404_naming_the_loaded_ones(api) -> None:  # type: ignore[no-untyped-def]
    _served, client = api
    with pytest.raises(openai.NotFoundError, match=r"no model named 'gpt-4o-mini'.*default"):
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )


async def test_malformed_bodies_and_routes_get_json_errors(api, short_dir: Path) -> None:  # type: ignore[no-untyped-def]
    _served, _client = api
    transport = httpx.AsyncHTTPTransport(uds=str(short_dir / "h.sock"))
    async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as http:
        r = await http.post("/v1/chat/completions", content=b"{not json")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = await http.post("/v1/chat/completions", content=b"[1, 2]")
        assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
        r = await http.post("/v1/completions", json={"prompt": ["a", "b"]})
        assert r.status_code == 400 and "exactly one string" in r.json()["error"]["message"]
        r = await http.post("/v1/embeddings", json={"input": [[1, 2, 3]]})
        assert r.status_code == 400 and "token arrays" in r.json()["error"]["message"]
        r = await http.get("/v1/nothing")
        assert r.status_code == 404 and "no route" in r.json()["error"]["message"]
        r = await http.get("/v1/chat/completions")
        assert r.status_code == 405 and "error" in r.json()
        big = b'{"prompt": "' + b"x" * (5 * 1024 * 1024) + b'"}'
        r = await http.post("/v1/completions", content=big)
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
        r = await http.get("/health")
        assert r.status_code == 200 and r.json() == {"ready": True}


async def test_tcp_listener_requires_the_token(serve, tiny_model: Path) -> None:
    port = free_port()
    await serve(tiny_model, http={"port": port, "token": TOKEN})
    base = f"http://127.0.0.1:{port}/v1"
    wrong = openai.AsyncOpenAI(api_key="wrong", base_url=base, max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="Bearer"):
        await wrong.models.list()
    right = openai.AsyncOpenAI(api_key=TOKEN, base_url=base, max_retries=0)
    reply = await right.completions.create(model="default", prompt="tcp works", max_tokens=2)
    assert reply.choices[0].text == "tcp works "
    await wrong.close()
    await right.close()


async def test_http_requests_are_counted_with_grpc_ones(api) -> None:  # type: ignore[no-untyped-def]
    served, client = api
    await client.completions.create(model="default", prompt="x", max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="nope", prompt="x", max_tokens=1)
    status = await served.client.status()
    counters = dict(status.counters)
    assert counters["/v1/completions.OK"] == 1
    assert counters["/v1/completions.NOT_FOUND"] == 1


async def test_full_queue_is_429_with_retry_after(
    serve, tiny_model: Path, short_dir: Path, monkeypatch
) -> None:
    monkeypatch.setattr(FakeSlot, "token_delay_s", 0.05)
    served = await serve(tiny_model, workers=1, http={"socket": str(short_dir / "h.sock")})
    pool = served.running.local.pools["default"]
    pool._queue.limit = 1
    client = unix_client(short_dir / "h.sock")
    busy = [
        asyncio.ensure_future(client.completions.create(model="", prompt="a", max_tokens=20))
        for _ in range(2)
    ]
    for _ in range(200):
        if len(pool._queue) >= 1:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(openai.RateLimitError, match="queue") as info:
        await client.completions.create(model="", prompt="b", max_tokens=1)
    assert info.value.response.headers["retry-after"] == "1"
    await asyncio.gather(*busy)
    await client.close()


async def test_closing_a_stream_frees_the_worker(
    serve, tiny_model: Path, short_dir: Path, monkeypatch
) -> None:
    monkeypatch.setattr(FakeSlot, "token_delay_s", 0.01)
    served = await serve(tiny_model, workers=1, http={"socket": str(short_dir / "h.sock")})
    pool = served.running.local.pools["default"]
    client = unix_client(short_dir / "h.sock")
    stream = await client.completions.create(model="", prompt="w", max_tokens=512, stream=True)
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            break
    await stream.close()
    await asyncio.sleep(0.1)  # the disconnect reaches the daemon
    at_close = pool._slots[0].tokens_made
    await asyncio.sleep(0.5)  # 50 more tokens if the work went on
    made = pool._slots[0].tokens_made
    assert made - at_close <= 2, f"the worker kept decoding after the client left ({made} tokens)"
    reply = await client.completions.create(model="", prompt="next", max_tokens=1)
    assert reply.choices[0].text == "next "
    await client.close()


async def test_http_socket_is_private_and_removed_on_shutdown(
    serve, tiny_model: Path, short_dir: Path
) -> None:

    path = short_dir / "h.sock"
    served = await serve(tiny_model, http={"socket": str(path)})
    assert path.stat().st_mode & 0o777 == 0o600
    await served.running.stop(grace=0)
    assert not path.exists()


async def test_a_busy_http_socket_refuses_the_start_and_leaves_it_alone(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    from sidecar.socket_claim import SocketBusy

    path = short_dir / "h.sock"
    await serve(tiny_model, http={"socket": str(path)})
    with pytest.raises(SocketBusy):
        await serve(tiny_model, socket=short_dir / "other.sock", http={"socket": str(path)})
    client = unix_client(path)
    assert [m.id for m in (await client.models.list()).data] == ["default"]
    await client.close()
