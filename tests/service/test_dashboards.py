"""Every series the shipped Grafana dashboard and alerting rules query exists in the
exposition of a live daemon that has served local and escalated requests.

The daemon is real (gRPC on its socket, the HTTP endpoint, /metrics over loopback, a fake
OpenAI-compatible cloud on loopback, fake worker slots). `tests/promql.py` reads every
PromQL expression of `packaging/grafana/` and `packaging/prometheus/`; the check is on the
names, on the values the expressions match with `=`, and on the labels they group by.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from fake_cloud import fake_cloud, ok
from prometheus_client.parser import text_string_to_metric_families
from promql import (
    DASHBOARD,
    Scrape,
    dashboard_queries,
    problems,
    rule_queries,
)

pytestmark = pytest.mark.asyncio

LABELS = ["card_arrival", "exchange_rate"]
TOKEN = "dashboards-test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: Scrape = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(dict(s.labels))
    return out


def post(port: int, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
async def busy_daemon(serve, tiny_model: Path) -> AsyncIterator[Scrape]:  # type: ignore[no-untyped-def]
    """A daemon that served local, escalated and refused requests; its scrape."""
    with fake_cloud() as (url, script):
        script.default = ok("exchange_rate", prompt=40, completion=2)
        port, http_port = free_port(), free_port()
        cloud = {"base_url": url, "model": "m", "retries": 0, "timeout_seconds": 5.0,
                 "prompt_price_per_mtok": 1.0, "completion_price_per_mtok": 2.0,
                 "daily_cap": 5.0, "monthly_cap": 50.0}  # fmt: skip
        s = await serve(
            tiny_model,
            metrics={"port": port},
            http={"port": http_port, "token": TOKEN},
            server={"ping_interval_seconds": 0.05},
            cloud=cloud,
        )
        c = s.client
        # Served locally: unary, streamed, over gRPC and over HTTP.
        await c.generate("a b c", max_tokens=4)
        _ = [x async for x in c.generate_stream("d e f", max_tokens=4)]
        await c.classify("x", LABELS, routing="LOCAL_ONLY")
        await c.embed(["hello"])
        await asyncio.to_thread(
            post, http_port, {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
        )
        # Escalated: asked for, and because the local answer was unsure.
        assert (await c.classify("1 euro", LABELS, routing="CLOUD_ONLY")).route.served_by == "cloud"
        router = s.running.router
        router.settings = replace(router.settings, classify_threshold=0.999)
        assert (await c.classify("my card", LABELS)).route.served_by == "cloud"
        # Shedding under memory pressure: refused when it must stay local, else escalated.
        sup = s.running.supervisor
        sup.server = replace(sup.server, min_available_mb=10**9)
        for _ in range(200):
            if s.running.local.shed_reason:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await c.generate("x", max_tokens=2, routing="LOCAL_ONLY")
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await c.generate("x", max_tokens=2)).route.reason_code == "local_overloaded"
        yield await asyncio.to_thread(scrape, port)


async def test_every_series_the_dashboard_queries_is_exposed(busy_daemon: Scrape) -> None:
    queries = list(dashboard_queries())
    assert len(queries) > 25  # the tokenizer found the panels' queries
    assert problems(queries, busy_daemon) == []


async def test_every_series_the_alerting_rules_query_is_exposed(busy_daemon: Scrape) -> None:
    queries = list(rule_queries())
    assert len(queries) >= 14
    assert problems(queries, busy_daemon) == []


async def test_a_renamed_series_or_label_value_is_caught(busy_daemon: Scrape) -> None:
    # The check is not vacuous: the shipped dashboard with one series renamed, one label
    # value misspelt and one grouping label renamed fails it, naming each.
    text = DASHBOARD.read_text()
    broken = (
        text.replace("sidecar_queue_depth{", "sidecar_queue_length{")
        .replace('served_by=\\"cloud\\"', 'served_by=\\"remote\\"')
        .replace("sum by (caller_class, route)", "sum by (caller, route)")
    )
    assert broken != text
    found = problems(list(dashboard_queries(json.loads(broken))), busy_daemon)
    assert any("sidecar_queue_length is not in the exposition" in p for p in found), found
    assert any("served_by='remote'" in p for p in found), found
    assert any("groups by 'caller'" in p for p in found), found
    # ...and so does a scrape that lacks a series the rules need.
    scrape = {k: v for k, v in busy_daemon.items() if k != "sidecar_model_serving"}
    found = problems(list(rule_queries()), scrape)
    assert found == ["rule SidecarModelNotServing: sidecar_model_serving is not in the exposition"]
