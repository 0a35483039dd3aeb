"""Prometheus exposition, scraped with real HTTP requests and parsed."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from fake_cloud import fake_cloud, ok
from prometheus_client.parser import text_string_to_metric_families
from tiny_gguf import write_tiny_llama

from sidecar.calls.callers import token_caller
from sidecar.v1 import inference_pb2 as pb

pytestmark = pytest.mark.asyncio

TOKEN = "metrics-test-token"
LABELS = ["card_arrival", "exchange_rate"]


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


def post_json(port: int, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


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


# ---------------------------------------------------------------- tokens, swaps, state


async def test_tokens_are_counted_by_model_route_and_caller_class_never_by_caller(
    serve, tiny_model: Path
) -> None:
    with fake_cloud() as (url, script):
        script.default = ok("exchange_rate", prompt=100, completion=3)
        port, http_port = free_port(), free_port()
        s = await serve(
            tiny_model,
            metrics={"port": port},
            http={"port": http_port, "token": TOKEN},
            cloud={"base_url": url, "model": "m", "retries": 0, "timeout_seconds": 5.0},
        )
        # gRPC on the Unix socket: the caller is "uid:<uid>/pid:<pid>", class "uid".
        g = await s.client.generate("a b c", max_tokens=4, routing="LOCAL_ONLY")
        chunks = [c async for c in s.client.generate_stream("d e", max_tokens=3)]
        streamed = chunks[-1].summary.usage
        c = await s.client.classify("1 euro in dollars", LABELS, routing="CLOUD_ONLY")
        assert c.route.served_by == "cloud"
        # The HTTP endpoint with a bearer token: class "token".
        body = {"model": "default", "prompt": "x y", "max_tokens": 2}
        reply = await asyncio.to_thread(post_json, http_port, "/v1/completions", body)
        text = await asyncio.to_thread(scrape_tcp, port)
    m = samples(text)

    def tokens(kind: str, route: str, cls: str) -> float:
        return value(
            m, f"sidecar_{kind}_tokens_total", model="default", route=route, caller_class=cls
        )

    assert tokens("prompt", "local", "uid") == g.usage.prompt_tokens + streamed.prompt_tokens
    assert (
        tokens("completion", "local", "uid")
        == g.usage.completion_tokens + streamed.completion_tokens
    )
    assert tokens("prompt", "cloud", "uid") == 100
    assert tokens("completion", "cloud", "uid") == 3
    assert tokens("prompt", "local", "token") == reply["usage"]["prompt_tokens"] > 0
    assert tokens("completion", "local", "token") == reply["usage"]["completion_tokens"] > 0
    # Every class exists from the start (at 0), so rate() sees its first tokens.
    assert tokens("prompt", "cloud", "app") == 0
    assert tokens("completion", "local", "internal") == 0
    # The caller's key never becomes a label: one series per class, whoever calls.
    assert f"uid:{os.getuid()}" not in text and "pid:" not in text
    assert token_caller(f"Bearer {TOKEN}") not in text


async def test_an_escalated_answer_counts_the_local_attempt_and_the_cloud_reply(
    serve, tiny_model: Path
) -> None:
    with fake_cloud() as (url, script):
        script.default = ok("exchange_rate", prompt=50, completion=1)
        s = await serve(
            tiny_model,
            cloud={"base_url": url, "model": "m", "retries": 0, "classify_threshold": 0.999},
        )
        r = await s.client.classify("where is my card", LABELS)
    assert r.route.served_by == "cloud" and r.route.reason_code == "low_confidence"
    reg = s.running.metrics.registry

    def tokens(route: str) -> float:
        labels = {"model": "default", "route": route, "caller_class": "uid"}
        return reg.get_sample_value("sidecar_prompt_tokens_total", labels) or 0.0

    assert tokens("local") > 0  # the worker read the prompt before the router escalated
    assert tokens("cloud") == 50
    assert reg.get_sample_value("sidecar_escalations_total", {"reason": "low_confidence"}) == 1


async def test_swaps_are_counted_by_outcome_and_refusing_stage(
    serve, tiny_model: Path, tmp_path: Path
) -> None:
    s = await serve(tiny_model)
    reg = s.running.metrics.registry

    def swaps(outcome: str, stage: str = "") -> float | None:
        labels = {"model": "default", "outcome": outcome, "stage": stage}
        return reg.get_sample_value("sidecar_swaps_total", labels)

    assert swaps("refused", "canary") == 0 and swaps("swapped") == 0  # present from the start
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        _ = [p async for p in s.client.admin.Swap(pb.SwapRequest(path=str(junk)))]
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert swaps("refused", "validating") == 1
    second = write_tiny_llama(tmp_path / "second.gguf", seed=2, n_ctx=4096)
    steps = [p async for p in s.client.admin.Swap(pb.SwapRequest(path=str(second)))]
    assert steps[-1].ok
    assert swaps("swapped") == 1 and swaps("refused", "validating") == 1
    version = steps[-1].new.version
    steps = [p async for p in s.client.admin.Swap(pb.SwapRequest(version=version))]
    assert swaps("unchanged") == 1 and swaps("swapped") == 1


async def test_state_gauges_show_readiness_queue_limit_shedding_and_caps(
    serve, tiny_model: Path
) -> None:
    port = free_port()
    s = await serve(
        tiny_model,
        metrics={"port": port},
        server={"ping_interval_seconds": 0.05},
        cloud={"base_url": "http://127.0.0.1:9/v1", "model": "m", "daily_cap": 2.5},
    )
    m = samples(await asyncio.to_thread(scrape_tcp, port))
    limit = s.running.local.status()[0][0].queue_limit
    assert value(m, "sidecar_queue_limit", model="default") == limit > 0
    assert value(m, "sidecar_model_serving", model="default") == 1
    assert value(m, "sidecar_shedding") == 0
    assert value(m, "sidecar_cloud_budget_cap", period="day") == 2.5
    assert value(m, "sidecar_cloud_budget_cap", period="month") == 0  # no cap
    assert value(m, "sidecar_update_rejections_total", model="default", reason="canary") == 0
    assert value(m, "sidecar_updates_total", model="default", path="delta") == 0
    # A memory floor no machine meets: the supervisor sheds, and the gauge says so.
    sup = s.running.supervisor
    sup.server = replace(sup.server, min_available_mb=10**9)
    for _ in range(200):
        if s.running.local.shed_reason:
            break
        await asyncio.sleep(0.02)
    m = samples(await asyncio.to_thread(scrape_tcp, port))
    assert value(m, "sidecar_shedding") == 1
    # A failing readiness probe turns "serving" off while a worker still lives.
    sup.probe_errors["default"] = "readiness probe failed: test"
    m = samples(await asyncio.to_thread(scrape_tcp, port))
    assert value(m, "sidecar_model_serving", model="default") == 0
    assert value(m, "sidecar_model_ready", model="default") == 1
