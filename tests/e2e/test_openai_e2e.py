"""Existing OpenAI-SDK code, pointed at the real daemon serving the real demo model."""

from __future__ import annotations

import json
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
from test_daemon import BANKING_LABELS, INVOICE, INVOICE_SCHEMA, Daemon  # type: ignore[import-not-found]

from sidecar.client import Client

pytestmark = pytest.mark.e2e

TOKEN = "e2e-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def daemon(smollm2: Path) -> Iterator[tuple[Daemon, int]]:
    short = Path(tempfile.mkdtemp(prefix="sc-oai-", dir="/tmp"))
    port = free_port()
    config = short / "sidecar.toml"
    config.write_text(f'[http]\nport = {port}\ntoken = "{TOKEN}"\n')
    d = Daemon(short / "s.sock", smollm2, config=config).wait_ready()
    yield d, port
    d.stop()


@pytest.fixture
def client(daemon: tuple[Daemon, int]) -> Iterator[openai.OpenAI]:
    _d, port = daemon
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKEN, max_retries=0)
    yield c
    c.close()


def test_chat_through_the_sdk_matches_grpc(daemon, client: openai.OpenAI) -> None:  # type: ignore[no-untyped-def]
    d, _port = daemon
    messages = [{"role": "user", "content": "What is the capital of France? One word."}]
    reply = client.chat.completions.create(model="default", messages=messages, max_tokens=16)
    text = reply.choices[0].message.content or ""
    assert "Paris" in text
    with Client(d.socket) as c:
        assert c.chat(messages, max_tokens=16).text == text


def test_streaming_chat_through_the_sdk(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(model="default", messages=messages, max_tokens=24)
    stream = client.chat.completions.create(
        model="default", messages=messages, max_tokens=24, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 3
    assert "".join(pieces) == whole.choices[0].message.content


def test_response_format_json_schema_gives_schema_valid_json(daemon, client: openai.OpenAI) -> None:  # type: ignore[no-untyped-def]
    d, _port = daemon
    reply = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": INVOICE}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "invoice", "schema": INVOICE_SCHEMA, "strict": True},
        },
        max_tokens=128,
    )
    text = reply.choices[0].message.content or ""
    data = json.loads(text)
    jsonschema.validate(data, INVOICE_SCHEMA)
    assert data["currency"] == "EUR"
    with Client(d.socket) as c:  # the same Extract gRPC runs
        assert c.extract(INVOICE, INVOICE_SCHEMA, max_tokens=128).json == text


def test_embeddings_through_the_sdk(client: openai.OpenAI) -> None:
    out = client.embeddings.create(model="default", input=BANKING_LABELS[:3])
    assert len(out.data) == 3
    assert len(out.data[0].embedding) == 576  # SmolLM2-135M's hidden size
    assert sum(x * x for x in out.data[0].embedding) == pytest.approx(1.0, abs=1e-3)


def test_bad_request_and_wrong_token_get_the_sdk_errors(daemon, client: openai.OpenAI) -> None:  # type: ignore[no-untyped-def]
    _d, port = daemon
    with pytest.raises(openai.BadRequestError, match="max_tokens") as info:
        client.completions.create(model="default", prompt="x", max_tokens=100_000)
    assert info.value.status_code == 400
    stranger = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    stranger.close()
    assert client.completions.create(model="default", prompt="Hi", max_tokens=1).choices
