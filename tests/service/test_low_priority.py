"""PRIORITY_LOW (what `sidecar eval` sends): a low-priority request waits until no normal
one does, so a caller behind a bulk run waits for at most the request already running,
not for the whole run. On a real daemon over its socket, fake workers slowed so the order
is visible."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from sidecar.client import InvalidRequestError
from sidecar.engine.fake import FakeSlot
from sidecar.v1 import inference_pb2 as pb

pytestmark = pytest.mark.asyncio
LABELS = ("card", "cash")
DELAY = 0.1


async def _order(client, low: bool) -> tuple[list[str], float]:  # type: ignore[no-untyped-def]
    """Six bulk requests, then one normal one from the same caller: the order they end in,
    and how long the normal one took."""
    done: list[str] = []

    async def one(name: str, low_priority: bool) -> float:
        started = time.perf_counter()
        await client.classify(name, LABELS, low_priority=low_priority)
        done.append(name)
        return time.perf_counter() - started

    bulk = [asyncio.create_task(one(f"bulk{i}", low)) for i in range(6)]
    await asyncio.sleep(DELAY / 2)  # the first bulk request runs, the rest wait
    took = await one("live", False)
    await asyncio.gather(*bulk)
    return done, took


async def test_a_normal_request_overtakes_queued_low_priority_ones(
    serve, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(FakeSlot, "token_delay_s", DELAY)
    s = await serve(tiny_model, workers=1)
    done, took = await _order(s.client, low=True)
    assert done.index("live") <= 1, done  # only the bulk request already running went first
    assert took < 3 * DELAY
    # the same burst at normal priority: one caller's queue is first come, first served
    done, took = await _order(s.client, low=False)
    assert done[-1] == "live", done
    assert took > 5 * DELAY


async def test_low_priority_extract_and_classify_by_examples_are_answered(
    serve, tiny_model: Path
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model, workers=1)
    r = await s.client.extract("Ann", {"type": "object", "properties": {"name": {"type": "string"}}},
                               low_priority=True)  # fmt: skip
    assert r.json
    c = await s.client.classify("my card", LABELS, low_priority=True)
    assert c.label in LABELS
    examples = [("lost my card", "card"), ("card missing", "card"), ("need cash", "cash"),
                ("atm cash", "cash")]  # fmt: skip
    c = await s.client.classify("my card", examples=examples, low_priority=True)
    assert c.label in LABELS and c.usage.prompt_tokens > 0  # the model embedded the query


async def test_an_unknown_priority_is_refused(serve, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model, workers=1)
    request = pb.ClassifyRequest(text="my card", labels=LABELS, priority=7)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="priority 7 is not known"):
        await s.client._unary(s.client.inference.Classify, request, None)


def _cloud_settings(url: str, **kw: object) -> dict[str, object]:
    return {"base_url": url, "model": "m", "retries": 0, **kw}


async def test_waiting_behind_live_load_does_not_count_against_the_local_timeout(
    serve, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from fake_cloud import fake_cloud, ok

    monkeypatch.setattr(FakeSlot, "token_delay_s", 0.05)
    with fake_cloud() as (url, script):
        script.default = ok("cash")
        s = await serve(tiny_model, workers=1,
                        cloud=_cloud_settings(url, local_timeout_seconds=0.4))  # fmt: skip
        live = asyncio.ensure_future(
            s.client.generate("busy", max_tokens=20, routing="LOCAL_ONLY")  # ~1 s of work
        )
        await asyncio.sleep(0.1)
        started = time.perf_counter()
        low = await s.client.classify("my card", LABELS, routing="AUTO", low_priority=True)
        waited = time.perf_counter() - started
        await live
        assert waited > 0.6  # it waited behind the live request, longer than the timeout...
        assert low.route.served_by == "local", low.route  # ...and was not escalated for it
        assert not script.received
        # a live request still has the wait counted: the caller feels it
        live = asyncio.ensure_future(s.client.generate("busy", max_tokens=20, routing="LOCAL_ONLY"))
        await asyncio.sleep(0.1)
        now = await s.client.classify("my card", LABELS, routing="AUTO")
        await live
        assert now.route.served_by == "cloud" and now.route.reason_code == "local_timeout"


async def test_low_priority_requests_beyond_max_queue_are_refused(
    serve, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from sidecar.client import ResourceExhaustedError

    monkeypatch.setattr(FakeSlot, "token_delay_s", 0.05)
    s = await serve(tiny_model, workers=1, model_keys={"max_queue": 2})
    live = asyncio.ensure_future(s.client.generate("busy", max_tokens=10))
    await asyncio.sleep(0.1)
    calls = [s.client.classify(f"t{i}", LABELS, low_priority=True) for i in range(4)]
    got = await asyncio.gather(*calls, return_exceptions=True)
    await live
    refused = [g for g in got if isinstance(g, ResourceExhaustedError)]
    assert len(refused) == 2, got
    assert "2 low-priority requests waiting" in str(refused[0])
    assert sum(1 for g in got if not isinstance(g, BaseException)) == 2
