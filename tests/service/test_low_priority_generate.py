"""PRIORITY_LOW on Generate and Chat: a low-priority generation waits behind normal ones and
still completes, with the reply it has at normal priority; a stream refuses LOW (it would
run as live work, which its caller asked it not to be). A real daemon over its socket, fake
workers slowed so the order is visible."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sidecar.client import InvalidRequestError
from sidecar.engine.fake import FakeSlot
from sidecar.v1 import inference_pb2 as pb

pytestmark = pytest.mark.asyncio
DELAY = 0.02  # per token


@pytest.mark.parametrize("kind", ["generate", "chat"])
async def test_a_low_generation_waits_behind_live_ones_and_still_completes(
    serve, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(FakeSlot, "token_delay_s", DELAY)
    s = await serve(tiny_model, workers=1)
    done: list[str] = []

    async def one(name: str, low: bool) -> pb.GenerateReply:
        if kind == "generate":
            r = await s.client.generate(f"{name} words", max_tokens=10, low_priority=low)
        else:
            r = await s.client.chat([("user", f"{name} words")], max_tokens=10, low_priority=low)
        done.append(name)
        return r

    first = asyncio.create_task(one("live1", False))
    await asyncio.sleep(DELAY * 3)  # live1 runs on the only worker
    low = asyncio.create_task(one("low", True))
    await asyncio.sleep(DELAY)
    second = asyncio.create_task(one("live2", False))
    replies = await asyncio.gather(first, low, second)
    assert done == ["live1", "live2", "low"], done  # the later live one went first
    assert replies[1].text == (await one("low", False)).text  # same reply as at normal priority


async def test_a_low_priority_stream_is_refused_with_what_to_do(serve, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model, workers=1)
    request = pb.GenerateRequest(prompt="hi", max_tokens=2, priority=pb.PRIORITY_LOW)
    with pytest.raises(InvalidRequestError, match="priority LOW is for unary Generate and Chat"):
        async for _ in s.client._stream(s.client.inference.GenerateStream, request, None):
            pass
    chat = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="hi")], max_tokens=2,
                          priority=pb.PRIORITY_LOW)  # fmt: skip
    with pytest.raises(InvalidRequestError, match="a stream runs at normal priority"):
        async for _ in s.client._stream(s.client.inference.ChatStream, chat, None):
            pass
    assert (await s.client.generate("hi", max_tokens=2)).text  # still serving


async def test_an_unknown_priority_on_generate_is_refused(serve, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model, workers=1)
    request = pb.GenerateRequest(prompt="hi", max_tokens=2, priority=5)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="priority 5 is not known"):
        await s.client._unary(s.client.inference.Generate, request, None)
