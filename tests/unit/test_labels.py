from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from sidecar.worker.labels import Row, log_softmax, normalise, score_sequences

VOCAB = 7


def row_for(context: Sequence[int]) -> Row:
    """A deterministic 'model': next-token log-probs depend on the whole context."""
    seed = hash(tuple(context)) % (2**32)
    return log_softmax(np.random.default_rng(seed).normal(size=VOCAB).astype(np.float32))


class FakeDecoder:
    def __init__(self, prompt: list[int]) -> None:
        self.cache = list(prompt)
        self.decoded = 0

    def truncate(self, n_tokens: int) -> None:
        self.cache = self.cache[:n_tokens]

    def decode(self, tokens: Sequence[int]) -> list[Row]:
        rows = []
        for t in tokens:
            self.cache.append(t)
            rows.append(row_for(self.cache))
        self.decoded += len(tokens)
        return rows


def brute_force(prompt: list[int], seq: Sequence[int]) -> float:
    return float(sum(row_for(prompt + list(seq[:j]))[tok] for j, tok in enumerate(seq)))


def test_scores_equal_scoring_each_label_from_scratch() -> None:
    prompt = [1, 2, 3]
    seqs = [[4, 5, 6], [4, 5, 0], [2], [4, 1, 1, 6], [6, 6]]
    dec = FakeDecoder(prompt)
    got = score_sequences(dec, len(prompt), row_for(prompt), seqs)
    want = [brute_force(prompt, s) for s in seqs]
    assert np.allclose(got, want)


def test_shared_label_prefixes_are_decoded_once() -> None:
    prompt = [1]
    # 4 labels of 4 tokens sharing a 3-token prefix: from scratch that is 4 * 3 decodes
    # (the last token needs no decode); with reuse, 3 for the first and 1 per other.
    seqs = [[2, 3, 4, t] for t in range(4)]
    dec = FakeDecoder(prompt)
    score_sequences(dec, len(prompt), row_for(prompt), seqs)
    assert dec.decoded == 3 + 3 * 0  # the differing token is the last: its row is shared
    seqs = [[2, 3, t, 6] for t in range(4)]
    dec = FakeDecoder(prompt)
    score_sequences(dec, len(prompt), row_for(prompt), seqs)
    assert dec.decoded == 3 + 3 * 1


def test_prompt_is_never_redecoded() -> None:
    prompt = list(range(5))
    dec = FakeDecoder(prompt)
    score_sequences(dec, len(prompt), row_for(prompt), [[1, 2], [3, 4], [5, 6]])
    assert dec.decoded == 3  # one non-final token per label, none of the prompt


def test_order_of_labels_does_not_change_scores() -> None:
    prompt = [0]
    seqs = [[1, 2], [1, 3], [2, 2, 2]]
    base = score_sequences(FakeDecoder(prompt), 1, row_for(prompt), seqs)
    for perm in itertools.permutations(range(3)):
        got = score_sequences(FakeDecoder(prompt), 1, row_for(prompt), [seqs[i] for i in perm])
        assert np.allclose(got, [base[i] for i in perm])


def test_normalise_is_a_softmax() -> None:
    p = normalise([-1.0, -2.0, -1000.0])
    assert abs(sum(p) - 1) < 1e-12
    assert p[0] > p[1] > p[2] >= 0
