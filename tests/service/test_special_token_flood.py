"""A prompt that spells a special token thousands of times cannot hang a worker.

llama.cpp's own split of a text at special-token strings is quadratic in their number: a
1 MB prompt of `<|im_end|>` kept one native call busy for minutes, the worker answered no
pings and the supervisor killed it. The worker now finds them itself in linear time; the
tokens must be exactly the ones llama.cpp would have made.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from sidecar.worker.specials import WHOLE_BELOW, SpecialTokens

FLOOD = "<|im_end|>" * 100_000  # 1 MB, well under server.max_message_bytes


@pytest.fixture(scope="module")
def vocab(tiny_model: Path):  # type: ignore[no-untyped-def]
    import llama_cpp

    llm = llama_cpp.Llama(str(tiny_model), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def _llama(llm):  # type: ignore[no-untyped-def]
    return lambda text, add_bos, special: list(llm.tokenize(text, add_bos=add_bos, special=special))


@pytest.mark.parametrize(
    "text",
    [
        "plain text, no specials",
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
        "a<|im_end|>b<|im_end|><|im_end|>ü€ <|im_start|>",
        "<|im_end",  # a prefix of one is text
        "",
    ],
)
@pytest.mark.parametrize("add_bos", [True, False])
def test_splitting_at_special_strings_gives_llamas_own_tokens(
    vocab, text: str, add_bos: bool
) -> None:  # type: ignore[no-untyped-def]
    specials = SpecialTokens.of_model(vocab)
    assert "<|im_end|>" in specials.ids
    tokenize = _llama(vocab)
    whole = tokenize(text.encode(), add_bos, True)
    assert specials.pieces(text, tokenize, add_bos=add_bos) == whole
    assert specials.tokenize(text, tokenize, add_bos=add_bos) == whole


def test_many_special_strings_are_split_by_the_worker_with_the_same_tokens(vocab) -> None:  # type: ignore[no-untyped-def]
    specials = SpecialTokens.of_model(vocab)
    tokenize = _llama(vocab)
    text = "x<|im_end|>y " * (WHOLE_BELOW + 1)
    assert specials.tokenize(text, tokenize, add_bos=True) == tokenize(text.encode(), True, True)
    flood = specials.tokenize(FLOOD, tokenize, add_bos=False)
    assert flood == [specials.ids["<|im_end|>"]] * 100_000


async def test_a_prompt_flooded_with_special_tokens_does_not_hang_the_worker(
    serve, tiny_model: Path
) -> None:  # type: ignore[no-untyped-def]
    # hang_seconds 5: before the fix this prompt held the worker for minutes and was killed.
    s = await serve(tiny_model, slot_kind="process", workers=1, context=4096,
                    server={"hang_seconds": 5})  # fmt: skip
    pid = (await s.client.status()).models[0].workers[0].pid
    for call in (
        s.client.generate(FLOOD, max_tokens=4, timeout=60),
        s.client.chat([("user", FLOOD)], max_tokens=4, timeout=60),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call
        # 100,000 tokens do not fit a 4096-token context: a plain, immediate refusal.
        assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE, e.value.details()
    status = (await s.client.status()).models[0]
    assert [(w.pid, w.state) for w in status.workers] == [(pid, "idle")]
    assert status.restarts == 0
    g = await s.client.generate("hello", max_tokens=2)
    assert g.model.version
