"""The daemon's token log-probabilities against llama.cpp run in this process on the demo
model: the same greedy tokens, and each token's log-probability equal to the log-softmax
of the logits llama.cpp computed at that step."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from test_daemon import Daemon  # type: ignore[import-not-found]

from sidecar.client import Client

pytestmark = pytest.mark.e2e

PROMPT = "The three primary colours are"
MAX_TOKENS = 24
TOP = 5


@pytest.fixture(scope="module")
def daemon(smollm2: Path) -> Iterator[Daemon]:
    short = Path(tempfile.mkdtemp(prefix="sc-lp-", dir="/tmp"))
    d = Daemon(short / "s.sock", smollm2).wait_ready()
    yield d
    d.stop()


def reference(model: Path, n: int) -> list[tuple[bytes, np.ndarray]]:
    """Greedy decoding with the raw llama.cpp API: (token bytes, log-softmax row) per step."""
    # The daemon's defaults: context 2048, batch 512, one thread, flash attention (the
    # batch decodes with it: see sidecar/worker/batch.py).
    llm = llama_cpp.Llama(
        model_path=str(model),
        n_ctx=2048,
        n_batch=512,
        n_ubatch=512,
        n_threads=1,
        flash_attn=True,
        verbose=False,
    )
    try:
        llm.eval(llm.tokenize(PROMPT.encode(), add_bos=True, special=False))
        out = []
        for _ in range(n):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
            logits = logits.astype(np.float64)
            row = logits - logits.max()
            row = row - np.log(np.exp(row).sum())
            token = int(np.argmax(row))
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                break
            out.append((llm.detokenize([token]), row))
            llm.eval([token])
        return out
    finally:
        llm.close()


def test_greedy_logprobs_match_in_process_llama_cpp(daemon: Daemon, smollm2: Path) -> None:
    with Client(daemon.socket) as c:
        reply = c.generate(PROMPT, max_tokens=MAX_TOKENS, logprobs=True, top_logprobs=TOP)
    got = list(reply.logprobs)
    want = reference(smollm2, len(got) + 1)
    assert len(got) >= 8, reply.text
    assert [t.bytes for t in got] == [b for b, _ in want[: len(got)]]
    for t, (_, row) in zip(got, want, strict=False):
        assert abs(t.logprob - float(row.max())) < 1e-4  # greedy: the sampled one is the top
        top = np.sort(row)[::-1][:TOP]
        assert np.allclose([a.logprob for a in t.top_logprobs], top, atol=1e-4)
        assert t.top_logprobs[0].bytes == t.bytes
    assert b"".join(t.bytes for t in got).decode() == reply.text
