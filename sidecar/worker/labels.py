"""Scoring candidate label continuations of one prompt, reusing the KV cache.

The prompt is decoded once. Each label is then scored as the sum of the
log-probabilities of its tokens (ending with the end-of-turn token, so "card" cannot
win by being a prefix of "card_arrival"). Labels are visited in token order so that
a label sharing a token prefix with the previous one only decodes what differs: the
cache is truncated back to the shared prefix, never to the start of the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

Row = npt.NDArray[np.float32]


class PrefixDecoder(Protocol):
    def truncate(self, n_tokens: int) -> None:
        """Keep only the first n_tokens positions of the cache."""

    def decode(self, tokens: Sequence[int]) -> list[Row]:
        """Append tokens; return one log-probability row per token, predicting the next."""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def score_sequences(
    decoder: PrefixDecoder, prompt_len: int, first_row: Row, seqs: Sequence[Sequence[int]]
) -> list[float]:
    """log P(seq | prompt) for each sequence; the cache must hold exactly the prompt."""
    scores = [0.0] * len(seqs)
    prev: Sequence[int] = ()
    prev_rows: list[Row] = [first_row]
    for i in sorted(range(len(seqs)), key=lambda k: list(seqs[k])):
        seq = seqs[i]
        # rows[j] predicts seq[j] from prompt + seq[:j]; rows shared with the previous
        # label are reused as long as the token prefix is the same.
        rows = prev_rows[: common_prefix(prev, seq) + 1]
        if len(seq) > len(rows):
            decoder.truncate(prompt_len + len(rows) - 1)
            rows = rows + decoder.decode(seq[len(rows) - 1 : len(seq) - 1])
        scores[i] = float(sum(rows[j][tok] for j, tok in enumerate(seq)))
        prev, prev_rows = seq, rows
    return scores


def log_softmax(logits: npt.NDArray[np.float32]) -> Row:
    shifted = logits - np.max(logits, axis=-1, keepdims=True)
    out: Row = shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
    return out


def normalise(logprobs: Sequence[float]) -> list[float]:
    """Softmax over the labels' sequence log-probabilities."""
    arr = np.asarray(logprobs, dtype=np.float64)
    arr = np.exp(arr - arr.max())
    return [float(x) for x in arr / arr.sum()]
