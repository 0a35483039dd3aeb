"""Continuous batching keeps greedy replies byte-identical: the demo model in a real daemon
(one worker, four sequence slots), mixed concurrent Generate, Chat, Extract and Classify
requests, streamed and not, of different lengths, each compared with the same request run
alone; also beside a neighbour cancelled mid-reply, and across more distinct task prompts
than the worker keeps shared prefixes for (so some are evicted while others run)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from sidecar.client import AsyncClient

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
# (kind, input, max_tokens, stream)
REQUESTS: list[tuple[str, Any, int, bool]] = [
    ("generate", "The capital of France is", 24, False),
    ("generate", "Once upon a time, in a village by the sea, there lived " * 3, 40, True),
    ("chat", [("user", "Name three colours.")], 32, False),
    ("extract", "John Smith is 42 years old and lives in Leeds.", 48, False),
    ("generate", "def fibonacci(n):", 16, True),
    ("chat", [("system", "Answer briefly."), ("user", "What is 2+2?")], 20, True),
    ("extract", "Mary, aged 30, works as a nurse.", 48, False),
    ("generate", "List: one, two,", 8, False),
    ("classify", "I lost my card yesterday", 0, False),
    ("classify", "What is the weather like in Leeds?", 1, False),
]
LABELS = (
    ("card lost", "card arrival", "exchange rate"),
    ("weather", "sport", "politics", "food"),
    ("question", "complaint"),
    ("urgent", "routine", "spam"),
    ("english", "french", "german"),
    ("positive", "negative", "neutral"),
)


async def ask(c: AsyncClient, kind: str, what: Any, n: int, stream: bool) -> str:
    if kind == "classify":  # n: which label set; the reply's exact probabilities
        r = await c.classify(what, LABELS[n], routing="LOCAL_ONLY")
        return " ".join(f"{s.label}={s.probability!r}" for s in r.scores)
    if kind == "extract":
        return (await c.extract(what, json.dumps(SCHEMA), max_tokens=n)).json
    if stream:
        call = (
            c.generate_stream(what, max_tokens=n)
            if kind == "generate"
            else c.chat_stream(what, max_tokens=n)
        )
        parts, summary = [], ""
        async for chunk in call:
            parts.append(chunk.text)
            summary = chunk.summary.text or summary
        text = "".join(parts)
        assert text == summary, (text, summary)
        return text
    reply = await (
        c.generate(what, max_tokens=n) if kind == "generate" else c.chat(what, max_tokens=n)
    )
    return str(reply.text)


async def test_greedy_replies_are_the_same_alone_and_batched(serve, smollm2: Path) -> None:
    # No readiness probe mid-test (a loaded machine takes over 30 s): the count below is exact.
    s = await serve(
        smollm2,
        slot_kind="process",
        workers=1,
        model_keys={"parallel": 4},
        server={"probe_interval_seconds": 3600},
    )
    alone = [await ask(s.client, *r) for r in REQUESTS]
    for _ in range(2):  # twice: the second round also reuses the cached prefixes
        batched = await asyncio.gather(*(ask(s.client, *r) for r in REQUESTS))
        assert list(batched) == alone
    assert all(alone)
    status = (await s.client.status()).models[0]
    assert status.workers[0].requests == 3 * len(REQUESTS)


async def test_concurrent_requests_all_finish_in_one_batching_worker(serve, smollm2: Path) -> None:
    s = await serve(smollm2, slot_kind="process", workers=1, model_keys={"parallel": 4})
    replies = await asyncio.gather(*(ask(s.client, *r) for r in REQUESTS))
    assert all(replies)
    for reply, (kind, _, _, _) in zip(replies, REQUESTS, strict=True):
        if kind == "extract":
            assert set(json.loads(reply)) == {"name", "age"}


async def test_concurrent_greedy_replies_match_alone_with_one_slot(serve, smollm2: Path) -> None:
    s = await serve(smollm2, slot_kind="process", workers=2, model_keys={"parallel": 1})
    alone = [await ask(s.client, *r) for r in REQUESTS]
    assert list(await asyncio.gather(*(ask(s.client, *r) for r in REQUESTS))) == alone


async def test_a_cancelled_request_leaves_its_neighbours_unchanged(serve, smollm2: Path) -> None:
    s = await serve(smollm2, slot_kind="process", workers=1, model_keys={"parallel": 4})
    kind, what, n, _ = REQUESTS[1]
    alone = await ask(s.client, kind, what, n, False)
    call = s.client.generate_stream("Tell me a very long story about dragons.", max_tokens=400)
    await call.read()  # it is decoding beside the next one
    neighbour = asyncio.create_task(ask(s.client, kind, what, n, False))
    await asyncio.sleep(0.2)
    call.cancel()
    assert await neighbour == alone


async def test_replies_stay_the_same_while_shared_prefixes_are_evicted(
    serve, smollm2: Path
) -> None:
    # Six label sets: six task prompts, more than the four prefixes a worker keeps.
    s = await serve(smollm2, slot_kind="process", workers=1, model_keys={"parallel": 4})
    mixed = [
        *(("classify", "My card has not arrived and I am upset", n, False) for n in range(6)),
        REQUESTS[1],
        REQUESTS[3],
        REQUESTS[5],
    ]
    alone = [await ask(s.client, *r) for r in mixed]
    for _ in range(2):
        assert list(await asyncio.gather(*(ask(s.client, *r) for r in mixed))) == alone
