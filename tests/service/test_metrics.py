"""Prometheus exposition, scraped with real HTTP requests and parsed."""

from __future__ import annotations

import asyncio
import http.client
import socket
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.asyncio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(all_: dict, name: str, **labels: str) -> float:
    return all_[(name, tuple(sorted(labels.items())))]


def scrape_tcp(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        return r.read().decode()


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def scrape_unix(path: Path) -> str:
    conn = UnixHTTPConnection(str(path))
    try:
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        assert r.status == 200
        return r.read().decode()
    finally:
        conn.close()


async def test_requests_latency_ttft_and_state_are_exposed_over_http(
    serve, tiny_model: Path
) -> None:
    port = free_port()
    s = await serve(tiny_model, workers=2, metrics={"port": port})
    for _ in range(3):
        await s.client.generate("a b c", max_tokens=4)
    await s.client.classify("x", ["a", "b"])
    with pytest.raises(grpc.aio.AioRpcError):
        await s.client.generate("")
    for typo in ("defualt", "Default", "x" * 40):
        with pytest.raises(grpc.aio.AioRpcError):
            await s.client.generate("hi", model=typo)
    text = await asyncio.to_thread(scrape_tcp, port)
    m = samples(text)
    ok = {"rpc": "Generate", "model": "default", "status": "OK", "tier": "local"}
    assert value(m, "sidecar_requests_total", **ok) == 3
    assert value(m, "sidecar_requests_total", **{**ok, "status": "INVALID_ARGUMENT"}) == 1
    assert value(m, "sidecar_requests_total", **{**ok, "rpc": "Classify"}) == 1
    # Unknown model names share one series, whatever callers send.
    assert (
        value(m, "sidecar_requests_total", **{**ok, "model": "unknown", "status": "NOT_FOUND"}) == 3
    )
    assert "defualt" not in text
    assert value(m, "sidecar_request_seconds_count", **ok) == 3
    assert value(m, "sidecar_time_to_first_token_seconds_count", model="default") == 4
    assert value(m, "sidecar_decode_tokens_per_second_count", model="default") == 3
    assert value(m, "sidecar_queue_depth", model="default") == 0
    assert value(m, "sidecar_workers", model="default", state="idle") == 2
    assert value(m, "sidecar_worker_restarts_total", model="default") == 0
    assert value(m, "sidecar_model_ready", model="default") == 1


async def test_metrics_on_a_unix_socket(serve, tiny_model: Path, short_dir: Path) -> None:
    path = short_dir / "metrics.sock"
    s = await serve(tiny_model, metrics={"socket": str(path)})
    await s.client.embed(["hello"])
    m = samples(await asyncio.to_thread(scrape_unix, path))
    assert (
        value(m, "sidecar_requests_total", rpc="Embed", model="default", status="OK", tier="local")
        == 1
    )
    assert (path.stat().st_mode & 0o777) == 0o600


async def test_metrics_are_off_by_default(serve, tiny_model: Path) -> None:
    s = await serve(tiny_model)
    assert s.running.metrics_server is None
