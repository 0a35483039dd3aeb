"""The daily cap holds under concurrency: each escalation reserves an upper bound of its
cost before calling and settles to the reported cost after, so 40 concurrent CLOUD_ONLY
requests cannot make more calls than the cap has room for (it let 7 through for 3)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from fake_cloud import fake_cloud, ok

LABELS = ["card_arrival", "exchange_rate"]
PER_CALL = (100 * 1.0 + 2 * 2.0) / 1e6  # what the cloud reports each call used


def settings(url: str, **kw: Any) -> dict[str, Any]:
    base = {"base_url": url, "model": "m", "backoff_seconds": 0.01, "retries": 0,
            "timeout_seconds": 5.0, "prompt_price_per_mtok": 1.0,
            "completion_price_per_mtok": 2.0}  # fmt: skip
    return base | kw


async def test_concurrent_requests_never_call_past_the_daily_cap(serve, tiny_model) -> None:  # type: ignore[no-untyped-def]
    room = 3  # calls the cap lets through one after another (the last may go over)
    # About 300 bytes: the 100 tokens the cloud reports are a realistic count for it.
    text = "where is my card, it has not arrived yet and I need it for my trip " * 4
    with fake_cloud() as (url, script):
        script.default, script.delay = ok("card_arrival", prompt=100, completion=2), 0.3
        s = await serve(tiny_model, cloud=settings(url, daily_cap=PER_CALL * (room - 0.5)))
        calls = [s.client.classify(text, LABELS, routing="CLOUD_ONLY") for _ in range(40)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        served = [r for r in results if not isinstance(r, BaseException)]
        assert len(refused) + len(served) == 40
        for e in refused:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
            assert "daily cloud budget" in (e.details() or "")
        assert 1 <= len(script.received) <= room
        assert len(served) == len(script.received)
        # Settled, the reservations are gone: calls one at a time fill the room, no more.
        for _ in range(room + 2):
            try:
                await s.client.classify(text, LABELS, routing="CLOUD_ONLY")
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                break
        assert len(script.received) == room
        st = (await s.client.status()).cloud
        assert st.spent_day == pytest.approx(room * PER_CALL)


async def test_every_call_is_paid_for_also_a_retry_and_a_rejected_answer(serve, tiny_model) -> None:  # type: ignore[no-untyped-def]
    with fake_cloud() as (url, script):
        s = await serve(tiny_model, cloud=settings(url))
        script.replies = [ok("banana", 100, 2), ok("card_arrival", 100, 2)]
        r = await s.client.classify("where is my card", LABELS, routing="CLOUD_ONLY")
        assert r.label == "card_arrival" and r.route.cost == pytest.approx(2 * PER_CALL)
        script.replies = [ok("banana", 100, 2), ok("still banana", 100, 2)]
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await s.client.classify("where is my card", LABELS, routing="CLOUD_ONLY")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert len(script.received) == 4
        st = (await s.client.status()).cloud
        assert st.spent_day == pytest.approx(4 * PER_CALL)  # the refused answer cost too
