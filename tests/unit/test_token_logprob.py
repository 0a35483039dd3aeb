"""TokenLogprob: a token's log-probability without the rest of the row, to the bit."""

from __future__ import annotations

import numpy as np
import pytest

from sidecar.worker.labels import TokenLogprob, log_softmax

VOCAB = 49_152  # SmolLM2's: long enough for numpy's pairwise sums to take several blocks


@pytest.mark.parametrize("seed", range(20))
def test_it_is_the_whole_rows_entry_to_the_bit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=VOCAB) * rng.uniform(0.5, 8)).astype(np.float32)
    row = log_softmax(logits)
    lp = TokenLogprob(VOCAB)
    top = int(np.argmax(logits))
    assert lp(logits, top, is_max=True) == float(row[top])
    for token in rng.integers(0, VOCAB, size=50):
        assert lp(logits, int(token)) == float(row[token])


def test_the_buffer_is_reused_and_the_logits_left_alone() -> None:
    logits = np.random.default_rng(1).normal(size=VOCAB).astype(np.float32)
    before = logits.copy()
    lp = TokenLogprob(VOCAB)
    a = lp(logits, 5)
    b = lp(logits, 5)
    assert a == b
    assert np.array_equal(logits, before)


def test_ties_and_a_certain_token() -> None:
    logits = np.zeros(VOCAB, np.float32)
    lp = TokenLogprob(VOCAB)
    assert lp(logits, 0, is_max=True) == float(log_softmax(logits)[0])  # log(1/VOCAB)
    logits[7] = 1000.0
    assert lp(logits, 7, is_max=True) == 0.0
    assert lp(logits, 8) == float(log_softmax(logits)[8])
