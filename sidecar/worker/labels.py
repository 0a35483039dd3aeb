"""Scoring candidate label continuations of one prompt, reusing the KV cache.

The prompt is decoded once. Each label is then scored as the sum of the
log-probabilities of its tokens (ending with the end-of-turn token, so "card" cannot
win by being a prefix of "card_arrival"). Labels are visited in token order so that
a label sharing a token prefix with the previous one only decodes what differs: the
cache is truncated back to the shared prefix, never to the start of the prompt.

`score_trie` gives the same sums with every label decoded at once (label_batch.py
decodes the trie for it); `score_sequences` stays as the reference it is tested against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


class TokenLogprob:
    """`log_softmax(logits)[token]` without the rest of the row, for a generation's every
    token: the same float32 operations in the same order, so the same bits, in one buffer
    kept between calls, without the last pass over the row and, after an argmax, without
    the max pass. Right after a decode the logits are cold in this core's cache, and the
    whole row (three fresh vocabulary-sized arrays) took 113 us a token in a worker, about
    4% of the demo model's step on two threads."""

    def __init__(self, n_vocab: int) -> None:
        self._buf = np.empty(n_vocab, np.float32)

    def __call__(self, logits: npt.NDArray[np.float32], token: int, is_max: bool = False) -> float:
        """`is_max`: `token` is the argmax, so its logit is the row's maximum."""
        top = logits[token] if is_max else np.max(logits)
        buf = self._buf
        np.subtract(logits, top, out=buf)
        shifted = buf[token]
        np.exp(buf, out=buf)
        return float(shifted - np.log(np.sum(buf)))


def normalise(logprobs: Sequence[float]) -> list[float]:
    """Softmax over the labels' sequence log-probabilities."""
    arr = np.asarray(logprobs, dtype=np.float64)
    arr = np.exp(arr - arr.max())
    return [float(x) for x in arr / arr.sum()]


# ---------------------------------------------------------------------- in one batch
#
# The same scores, with every label decoded at once: the label continuations form a
# trie over the prompt, each node (a distinct token prefix) is decoded once, at position
# prompt_len + depth, in the sequence of every label that passes through it. A node's
# row predicts its children; the scores are summed exactly as `score_sequences` sums them.


@dataclass(frozen=True)
class TrieNode:
    token: int
    depth: int  # 0: the first label token, right after the prompt
    labels: tuple[int, ...]  # positions in the group of the labels through it, ascending
    children: tuple[int, ...]  # the tokens its row is read at


class NoRoom(Exception):
    """The cache has no cells free for this many label tokens at once."""


class TrieDecoder(Protocol):
    def decode_trie(self, prompt_len: int, nodes: Sequence[TrieNode], n_labels: int) -> list[Row]:
        """Decode the nodes (a group of n_labels labels) after the prompt; for each node,
        its log-probabilities at its children's tokens (in that order). Leaves the cache
        holding exactly the prompt. Raises NoRoom when the cells do not fit."""


def label_trie(seqs: Sequence[Sequence[int]]) -> tuple[list[TrieNode], list[list[int]]]:
    """The trie of `seqs` (each continuation without its last token, which predicts
    nothing) in depth-first order, and for each seq the node of each of its tokens but
    the first. Depth-first keeps the nodes of each label's first sequence id together in
    the batch, the layout llama.cpp's batches are built for."""
    prefixes: dict[tuple[int, ...], list[int]] = {}
    for k, seq in enumerate(seqs):
        for d in range(1, len(seq)):
            prefixes.setdefault(tuple(seq[:d]), []).append(k)
    order = sorted(prefixes)  # lexicographic = depth-first, children in token order
    index = {p: i for i, p in enumerate(order)}
    children: list[list[int]] = [[] for _ in order]
    for seq in seqs:
        for d in range(1, len(seq)):
            kids = children[index[tuple(seq[:d])]]
            if seq[d] not in kids:
                kids.append(seq[d])
    nodes = [
        TrieNode(p[-1], len(p) - 1, tuple(prefixes[p]), tuple(children[i]))
        for i, p in enumerate(order)
    ]
    paths = [[index[tuple(seq[:d])] for d in range(1, len(seq))] for seq in seqs]
    return nodes, paths


def label_groups(seqs: Sequence[Sequence[int]], max_labels: int, max_nodes: int) -> list[list[int]]:
    """Label indices in token order, cut into runs of at most max_labels labels and
    max_nodes trie nodes: one decode each. Runs keep shared prefixes together."""
    groups: list[list[int]] = []
    nodes = 0
    prev: Sequence[int] = ()
    for k in sorted(range(len(seqs)), key=lambda i: list(seqs[i])):
        seq = seqs[k]
        shared = min(common_prefix(prev, seq), len(prev) - 1) if prev else 0
        new = max(0, len(seq) - 1 - shared)
        if not groups or len(groups[-1]) >= max_labels or nodes + new > max_nodes:
            groups.append([])
            new = max(0, len(seq) - 1)
            nodes = 0
        groups[-1].append(k)
        nodes += new
        prev = seq
    return groups


def score_trie(
    decoder: TrieDecoder,
    prompt_len: int,
    first_row: Row,
    seqs: Sequence[Sequence[int]],
    max_labels: int,
    max_nodes: int,
    between: Callable[[], None] = lambda: None,
) -> tuple[list[float], int]:
    """What `score_sequences` returns, decoding each group of labels in one call; also
    the number of label tokens decoded. `between` runs before every group but the first
    (to notice cancellation); a group the cache has no room for is halved."""
    scores = [0.0] * len(seqs)
    decoded = 0
    pending = label_groups(seqs, max_labels, max_nodes)
    first = True
    while pending:
        group = pending.pop(0)
        if not first:
            between()
        first = False
        nodes, paths = label_trie([seqs[k] for k in group])
        try:
            picks = decoder.decode_trie(prompt_len, nodes, len(group))
        except NoRoom:
            if len(group) == 1:
                raise
            half = len(group) // 2
            pending[:0] = [group[:half], group[half:]]
            continue
        decoded += len(nodes)
        for k, path in zip(group, paths, strict=True):
            seq = seqs[k]
            # terms[j] = log P(seq[j] | prompt + seq[:j]), as score_sequences reads them
            terms = [first_row[seq[0]]]
            for j, n in enumerate(path, start=1):
                terms.append(picks[n][nodes[n].children.index(seq[j])])
            scores[k] = float(sum(terms))
    return scores, decoded
