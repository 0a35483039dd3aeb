"""The real daemon with real llama.cpp in spawned worker processes, on tiny GGUF models."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message

pytestmark = pytest.mark.asyncio

SCHEMA = {
    "type": "object",
    # Bounded on purpose: a random-weight model would otherwise ramble inside a string.
    "properties": {"name": {"enum": ["ann", "bob"]}, "member": {"type": "boolean"}},
    "required": ["name", "member"],
}


def without_timings(m: Message) -> bytes:
    copy = type(m)()
    copy.CopyFrom(m)
    copy.ClearField("timings")
    return copy.SerializeToString(deterministic=True)


async def code_of(awaitable: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await awaitable  # type: ignore[misc]
    return e.value.code(), e.value.details() or ""


async def test_all_rpcs_run_on_real_llama_cpp_workers(serve, tiny_model: Path) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=1024)
    c = s.client
    gen = await c.generate("hello", max_tokens=8)
    assert gen.usage.prompt_tokens == 6  # BOS + 5 bytes: the tiny vocab is byte-level
    assert 0 < gen.usage.completion_tokens <= 8
    assert gen.confidence.min_logprob <= gen.confidence.mean_logprob < 0
    chunks = [ch async for ch in c.generate_stream("hello", max_tokens=8)]
    assert "".join(ch.text for ch in chunks[:-1]) == chunks[-1].summary.text == gen.text
    chat = await c.chat([("user", "hi")], max_tokens=4)
    assert chat.usage.prompt_tokens > 2
    cls = await c.classify("some text", ["alpha", "beta", "gamma"])
    assert cls.label in {"alpha", "beta", "gamma"}
    assert abs(sum(x.probability for x in cls.scores) - 1) < 1e-6
    assert cls.scores[0].label == cls.label
    assert cls.usage.completion_tokens > 0  # label tokens were decoded after the prompt
    ext = await c.extract("Ann is 3", SCHEMA, max_tokens=120)
    value = json.loads(ext.json)
    assert value["name"] in ("ann", "bob") and isinstance(value["member"], bool)
    emb = await c.embed(["a", "bc", "def"], normalize=True)
    assert len(emb.embeddings) == 3
    assert all(abs(sum(v * v for v in e.values) - 1) < 1e-3 for e in emb.embeddings)
    assert emb.usage.prompt_tokens == 2 + 3 + 4


async def test_greedy_replies_are_byte_identical_across_requests_and_workers(
    serve, tiny_model: Path
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=2, context=1024)
    c = s.client
    for make in (
        lambda: c.generate("determinism", max_tokens=16),
        lambda: c.classify("which one", ["north", "south", "east", "west"]),
        lambda: c.extract("Bob is 40", SCHEMA, max_tokens=120),
    ):
        replies = await asyncio.gather(*(make() for _ in range(4)))  # spread over both workers
        assert len({without_timings(r) for r in replies}) == 1


async def test_prompt_longer_than_the_context_is_out_of_range(serve, tiny_model: Path) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=64)
    got, details = await code_of(s.client.generate("x" * 100))
    assert got == grpc.StatusCode.OUT_OF_RANGE
    assert "context window is 64" in details
    got, details = await code_of(s.client.generate("x" * 20, max_tokens=60))
    assert got == grpc.StatusCode.OUT_OF_RANGE
    assert "set max_tokens to at most" in details
    got, _ = await code_of(s.client.classify("x" * 100, ["a", "b"]))
    assert got == grpc.StatusCode.OUT_OF_RANGE
    assert (await s.client.generate("ok", max_tokens=2)).usage.completion_tokens >= 1


async def test_schema_the_grammar_converter_cannot_handle_is_invalid_argument(
    serve, tiny_model: Path
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=1024)
    got, details = await code_of(s.client.extract("x", {"minimum": 0}))
    assert got == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot be turned into a grammar" in details and "`type`" in details
    got, _ = await code_of(s.client.extract("x", {"$ref": "http://example.com/s.json"}))
    assert got == grpc.StatusCode.INVALID_ARGUMENT
    assert (await s.client.extract("Ann is 3", SCHEMA, max_tokens=120)).json


async def test_unfinished_json_within_max_tokens_is_out_of_range(serve, tiny_model: Path) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=1024)
    got, details = await code_of(s.client.extract("Ann is 3", SCHEMA, max_tokens=3))
    assert got == grpc.StatusCode.OUT_OF_RANGE
    assert "raise max_tokens" in details


async def test_worker_crash_fails_its_request_with_unavailable_and_the_daemon_recovers(
    serve, tiny_model: Path
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=512)
    c = s.client
    old_pid = (await c.status()).models[0].workers[0].pid
    stream = c.generate_stream("crash me", max_tokens=400)
    await stream.read()
    os.kill(old_pid, signal.SIGKILL)
    got, details = await code_of(_drain(stream))
    assert got == grpc.StatusCode.UNAVAILABLE
    assert "exited" in details
    assert await c.health("") == "SERVING"  # the daemon itself never went down
    for _ in range(100):
        st = await c.status()
        w = st.models[0].workers[0]
        if w.pid != old_pid and w.state == "idle":
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail(f"worker was not replaced: {st}")
    assert (await c.generate("after", max_tokens=2)).usage.completion_tokens >= 1


async def _drain(call: grpc.aio.UnaryStreamCall) -> None:
    while await call.read() is not grpc.aio.EOF:
        pass


async def test_cancelled_stream_frees_a_real_worker(serve, tiny_model: Path) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=1024)
    c = s.client
    stream = c.generate_stream("long", max_tokens=1000)
    for _ in range(3):
        await stream.read()
    stream.cancel()
    # One worker: if it were still decoding 1000 tokens this would wait behind it.
    reply = await c.generate("next", max_tokens=1, timeout=30)
    assert reply.usage.completion_tokens == 1
    assert reply.timings.queue_ms < 5000


async def test_unloadable_model_file_fails_start_with_a_clear_error(serve, short_dir: Path) -> None:
    bad = short_dir / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(Exception, match=r"bad\.gguf"):
        await serve(bad, slot_kind="process", workers=1)


async def test_in_process_engine_gives_the_same_answers(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    a = await serve(tiny_model, slot_kind="thread", workers=1, context=1024)
    ra = await a.client.classify("which one", ["north", "south"])
    ga = await a.client.generate("same", max_tokens=8)
    b = await serve(
        tiny_model, slot_kind="process", workers=1, context=256, socket=short_dir / "b.sock"
    )
    rb = await b.client.classify("which one", ["north", "south"])
    gb = await b.client.generate("same", max_tokens=8)
    assert without_timings(ra) == without_timings(rb)
    assert without_timings(ga) == without_timings(gb)


async def test_task_prefix_cache_hits_and_keeps_replies_byte_identical(
    serve, tiny_model: Path
) -> None:
    s = await serve(tiny_model, slot_kind="thread", workers=1, context=1024)
    c = s.client
    runner = s.running.local.pools["default"].workers()[0]._runner
    labels = ["north", "south", "east", "west"]
    fresh = without_timings(await c.classify("which way", labels))
    again = without_timings(await c.classify("which way", labels))
    # The prefixes live in sequences of their own: other work does not evict them.
    await c.generate("something else entirely", max_tokens=4)
    after_other = without_timings(await c.classify("which way", labels))
    other_text = await c.classify("a different text", labels)
    assert fresh == again == after_other
    assert runner.prefix_hits == 3  # every request after the first reused the prefix
    assert other_text.label in labels
    e1 = without_timings(await c.extract("Bob is 40", SCHEMA, max_tokens=120))
    e2 = without_timings(await c.extract("Bob is 40", SCHEMA, max_tokens=120))
    assert e1 == e2 and runner.prefix_hits == 4
