"""What the daemon says: where it listens, and errors in its own words (issue 13)."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import grpc
import httpx2 as httpx
import pytest

SCHEMA_NOT = {"type": "object", "properties": {"a": {"type": "string"}}, "not": {}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    return e.value.code(), e.value.details() or ""


async def test_start_up_log_names_every_listener(
    serve, tiny_model: Path, short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="sidecar")
    metrics = short_dir / "m.sock"
    s = await serve(
        tiny_model,
        server={"tcp_port": free_port(), "tcp_host": "127.0.0.1", "tcp_token": "secret-token-1"},
        metrics={"socket": str(metrics)},
    )
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("sidecar")]
    assert any(f"unix:{s.socket}" in x and "gRPC" in x for x in lines), lines
    tcp = s.running.grpc.tcp_port
    assert tcp and any(f"127.0.0.1:{tcp}" in x and "gRPC" in x for x in lines), lines
    assert any(f"unix:{metrics}" in x and "metrics" in x for x in lines), lines


async def test_metrics_on_tcp_is_logged_with_its_port(
    serve, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    caplog.set_level(logging.INFO, logger="sidecar")
    await serve(tiny_model, metrics={"host": "127.0.0.1", "port": port})
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"http://127.0.0.1:{port}/metrics" in x for x in lines), lines


async def test_with_no_cloud_errors_never_mention_escalation(
    serve, tiny_model: Path, short_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    # AUTO with no cloud: a local failure AUTO would escalate is the error, as it is.
    http = short_dir / "h.sock"
    s = await serve(tiny_model, http={"socket": str(http)})
    code, msg = await code_of(s.client.generate("hi", max_tokens=10**6))
    assert code == grpc.StatusCode.OUT_OF_RANGE
    assert "context window" in msg
    assert "escalat" not in msg and "cloud" not in msg
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(http))) as h:
        r = await h.post(
            "http://sidecar/v1/chat/completions",
            json={"model": "default", "messages": [{"role": "user", "content": "hi"}],
                  "max_tokens": 10**6},
        )  # fmt: skip
    assert r.status_code == 400, r.text
    text = r.json()["error"]["message"]
    assert "context window" in text and "escalat" not in text and "cloud" not in text
    # ...and the daemon keeps serving.
    assert (await s.client.generate("hi", max_tokens=2)).usage.completion_tokens >= 1


@pytest.mark.parametrize(
    ("schema", "keyword", "where"),
    [
        ({"not": {}}, "not", "/not"),
        (SCHEMA_NOT, "not", "/not"),
        ({"type": "object", "properties": {"a": {"if": {"type": "string"}}}}, "if", "/properties/a/if"),
        ({"type": "array", "items": {"type": "string"}, "contains": {"const": "x"}}, "contains", "/contains"),
    ],
)  # fmt: skip
async def test_schema_keywords_the_grammar_cannot_enforce_are_invalid_argument(
    serve, tiny_model: Path, schema: dict[str, Any], keyword: str, where: str
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model)
    code, msg = await code_of(s.client.extract("x", schema))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, msg
    assert f"`{keyword}`" in msg and where in msg
    # The same refusal for a request that would go to the cloud.
    code, _ = await code_of(s.client.extract("x", schema, routing="CLOUD_ONLY"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
