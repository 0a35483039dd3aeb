"""Token log-probabilities over gRPC and the OpenAI-compatible HTTP API, on tiny llama.cpp
in worker processes (the pipe carries them) and through the official `openai` SDK."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import pytest

from sidecar.v1 import inference_pb2 as pb

pytestmark = pytest.mark.asyncio

MESSAGES = [("user", "Tell me a story about a cat")]


def generated(reply: pb.GenerateReply) -> int:
    """Tokens that made text: the end-of-turn marker is counted in usage but not an answer."""
    eog = reply.finish_reason == pb.FINISH_REASON_STOP
    return reply.usage.completion_tokens - (1 if eog else 0)


def check_tokens(tokens: list[pb.TokenLogprob], text: str, top: int) -> None:
    assert "".join(t.token for t in tokens) == text
    for t in tokens:
        assert t.logprob <= 0.0 and math.isfinite(t.logprob)
        assert len(t.top_logprobs) == top
        values = [a.logprob for a in t.top_logprobs]
        assert values == sorted(values, reverse=True)
        if top:
            # The sampled token is in the list whenever it is at least as likely as the last.
            if t.logprob >= values[-1] + 1e-6:
                assert any(a.bytes == t.bytes and a.logprob == t.logprob for a in t.top_logprobs)
            # A distribution's top-k cannot add up to more than 1.
            assert sum(math.exp(v) for v in values) <= 1.0 + 1e-5


@pytest.fixture
async def served(serve, tiny_model: Path):  # type: ignore[no-untyped-def]
    return await serve(tiny_model, slot_kind="process", workers=1)


@pytest.mark.parametrize("top", [0, 5])
async def test_unary_replies_carry_one_logprob_per_token(served, top: int) -> None:  # type: ignore[no-untyped-def]
    c = served.client
    gen = await c.generate("Once upon a time", max_tokens=12, logprobs=True, top_logprobs=top)
    assert len(gen.logprobs) == generated(gen) >= 1
    check_tokens(list(gen.logprobs), gen.text, top)
    # The confidence comes from the same numbers.
    values = [t.logprob for t in gen.logprobs]
    assert gen.confidence.min_logprob == pytest.approx(min(values))
    assert gen.confidence.mean_logprob == pytest.approx(sum(values) / len(values))
    chat = await c.chat(MESSAGES, max_tokens=12, logprobs=True, top_logprobs=top)
    assert len(chat.logprobs) == generated(chat) >= 1
    check_tokens(list(chat.logprobs), chat.text, top)
    plain = await c.generate("Once upon a time", max_tokens=12)
    assert plain.text == gen.text and not plain.logprobs  # off unless asked


async def test_streams_carry_each_tokens_logprob_with_its_text(served) -> None:  # type: ignore[no-untyped-def]
    c = served.client
    for call in (
        c.generate_stream("Once upon a time", max_tokens=12, logprobs=True, top_logprobs=3),
        c.chat_stream(MESSAGES, max_tokens=12, logprobs=True, top_logprobs=3),
    ):
        chunks = [x async for x in call]
        summary = chunks[-1].summary
        pieces = chunks[:-1]
        streamed = [t for x in pieces for t in x.logprobs]
        assert "".join(x.text for x in pieces) == summary.text
        assert len(streamed) == len(summary.logprobs) == generated(summary)
        assert list(streamed) == list(summary.logprobs)
        for x in pieces:  # each chunk's tokens made exactly the chunk's text
            assert "".join(t.token for t in x.logprobs) == x.text
        check_tokens(streamed, summary.text, 3)


async def test_a_stop_sequence_cuts_the_tokens_text_too(served) -> None:  # type: ignore[no-untyped-def]
    c = served.client
    first = await c.generate("Once upon a time", max_tokens=12)
    stop = first.text[3:5]
    assert stop.strip(), first.text
    gen = await c.generate("Once upon a time", max_tokens=12, stop=[stop], logprobs=True)
    assert gen.text == first.text[: first.text.index(stop)]
    assert "".join(t.token for t in gen.logprobs) == gen.text
    assert len(gen.logprobs) == gen.usage.completion_tokens


@pytest.mark.parametrize(
    ("logprobs", "top", "match"),
    [(True, 21, "between 0 and 20"), (False, 3, "top_logprobs needs logprobs")],
)
async def test_bad_logprob_requests_are_invalid_argument(served, logprobs, top, match) -> None:  # type: ignore[no-untyped-def]
    c = served.client
    for call in (
        c.generate("hi", max_tokens=2, logprobs=logprobs, top_logprobs=top),
        c.chat(MESSAGES, max_tokens=2, logprobs=logprobs, top_logprobs=top),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert match in (e.value.details() or "")


# ---------------------------------------------------------------- the openai SDK


async def test_sdk_parses_chat_logprobs_unary_and_streamed(api) -> None:  # type: ignore[no-untyped-def]
    served, client = api
    messages = [{"role": "user", "content": "Tell me a story about a cat"}]
    reply = await client.chat.completions.create(
        model="default", messages=messages, max_tokens=10, logprobs=True, top_logprobs=2
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    grpc_reply = await served.client.chat(
        [("user", messages[0]["content"])], max_tokens=10, logprobs=True, top_logprobs=2
    )
    assert [t.logprob for t in content] == [t.logprob for t in grpc_reply.logprobs]
    assert [bytes(t.bytes or []) for t in content] == [t.bytes for t in grpc_reply.logprobs]
    assert all(len(t.top_logprobs) == 2 for t in content)
    stream = await client.chat.completions.create(
        model="default",
        messages=messages,
        max_tokens=10,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    )
    streamed = []
    async for chunk in stream:
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.content:
                streamed.extend(c.logprobs.content)
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    plain = await client.chat.completions.create(model="default", messages=messages, max_tokens=4)
    assert plain.choices[0].logprobs is None


async def test_sdk_parses_legacy_completion_logprobs_unary_and_streamed(api) -> None:  # type: ignore[no-untyped-def]
    _served, client = api
    prompt = "Once upon a time"
    reply = await client.completions.create(
        model="default", prompt=prompt, max_tokens=8, logprobs=3
    )
    lp = reply.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert lp.text_offset is not None
    assert "".join(lp.tokens) == reply.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.text_offset[0] == len(prompt)
    for tok, off in zip(lp.tokens, lp.text_offset, strict=True):
        assert (prompt + reply.choices[0].text)[off : off + len(tok)] == tok
    assert all(1 <= len(alts) <= 3 for alts in lp.top_logprobs)  # equal texts share a key
    stream = await client.completions.create(
        model="default", prompt=prompt, max_tokens=8, logprobs=3, stream=True
    )
    tokens, offsets, values = [], [], []
    async for chunk in stream:
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.tokens:
                tokens += c.logprobs.tokens
                offsets += c.logprobs.text_offset or []
                values += c.logprobs.token_logprobs or []
    assert (tokens, offsets, values) == (lp.tokens, lp.text_offset, lp.token_logprobs)


@pytest.mark.parametrize(
    ("path", "body", "match"),
    [
        ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "between 0 and 20"),
        ("chat/completions", {"top_logprobs": 2}, "top_logprobs needs logprobs"),
        (
            "chat/completions",
            {"logprobs": True, "response_format": {"type": "json_object"}},
            "not supported with 'response_format'",
        ),
        ("completions", {"logprobs": 6}, "between 0 and 5"),
        ("completions", {"logprobs": True}, "must be an integer"),
    ],
)
async def test_bad_http_logprob_requests_are_400(api, path, body, match) -> None:  # type: ignore[no-untyped-def]
    _served, client = api
    base = (
        {"messages": [{"role": "user", "content": "hi"}]}
        if path.startswith("chat")
        else {"prompt": "hi"}
    )
    with pytest.raises(Exception) as e:
        await client.post(f"/{path}", cast_to=object, body={**base, **body, "max_tokens": 2})
    assert getattr(e.value, "status_code", None) == 400, e.value
    assert match in str(e.value)
