"""The trie scorer (all labels in one decode) against the sequential scorer it replaces."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from sidecar.worker.labels import (
    NoRoom,
    Row,
    TrieNode,
    label_groups,
    label_trie,
    log_softmax,
    score_sequences,
    score_trie,
)

VOCAB = 11


def row_for(context: Sequence[int]) -> Row:
    """A deterministic 'model': next-token log-probs depend on the whole context."""
    seed = hash(tuple(context)) % (2**32)
    return log_softmax(np.random.default_rng(seed).normal(size=VOCAB).astype(np.float32))


class FakeDecoder:
    """The sequential scorer's decoder (as in test_labels.py)."""

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


class FakeTrieDecoder:
    """Decodes each node from prompt + its prefix, checking what a batch would need."""

    def __init__(self, prompt: list[int], room: int = 10**9) -> None:
        self.prompt = prompt
        self.room = room  # label tokens the 'cache' takes at once
        self.calls: list[tuple[int, int]] = []  # (nodes, labels) per decode

    def decode_trie(self, prompt_len: int, nodes: Sequence[TrieNode], n_labels: int) -> list[Row]:
        assert prompt_len == len(self.prompt)
        if len(nodes) > self.room:
            raise NoRoom("full")
        self.calls.append((len(nodes), n_labels))
        out: list[Row] = []
        path: list[int] = []
        for node in nodes:
            path = [*path[: node.depth], node.token]  # depth-first: the parent is on the path
            row = row_for(self.prompt + path)
            out.append(row[list(node.children)])
        return out


SEQS = [[4, 5, 6], [4, 5, 0], [2], [4, 1, 1, 6], [6, 6], [4, 5, 6, 6, 1], [2, 3]]


def sequential(prompt: list[int], seqs: list[list[int]]) -> tuple[list[float], int]:
    dec = FakeDecoder(prompt)
    return score_sequences(dec, len(prompt), row_for(prompt), seqs), dec.decoded


@pytest.mark.parametrize(("max_labels", "max_nodes"), [(100, 100), (2, 100), (100, 3), (1, 1)])
def test_scores_and_token_count_equal_the_sequential_scorer_exactly(
    max_labels: int, max_nodes: int
) -> None:
    prompt = [1, 2, 3]
    want, decoded = sequential(prompt, SEQS)
    dec = FakeTrieDecoder(prompt)
    got, n = score_trie(dec, len(prompt), row_for(prompt), SEQS, max_labels, max_nodes)
    assert got == want  # the same float32 sums in the same order: bit for bit
    if len(dec.calls) == 1:
        assert n == decoded  # one group decodes each shared prefix once, as one-by-one does
    assert all(labels <= max_labels for _, labels in dec.calls)


def test_shared_prefixes_are_decoded_once_in_one_call() -> None:
    prompt = [0]
    seqs = [[2, 3, t, 6] for t in range(4)]
    dec = FakeTrieDecoder(prompt)
    _, n = score_trie(dec, 1, row_for(prompt), seqs, 128, 512)
    assert dec.calls == [(2 + 4, 4)]  # [2], [2,3] once; then one node per label
    assert n == 6


def test_nodes_carry_every_label_through_them_in_depth_first_order() -> None:
    nodes, paths = label_trie([[7, 8, 0], [7, 9, 0], [5, 0]])
    assert [(n.token, n.depth, n.labels, n.children) for n in nodes] == [
        (5, 0, (2,), (0,)),
        (7, 0, (0, 1), (8, 9)),
        (8, 1, (0,), (0,)),
        (9, 1, (1,), (0,)),
    ]
    assert paths == [[1, 2], [1, 3], [0]]


def test_groups_respect_both_limits_and_keep_token_order() -> None:
    seqs = [[1, 2, 0], [1, 3, 0], [1, 4, 0], [5, 0], [6, 7, 8, 0]]
    assert label_groups(seqs, 10, 100) == [[0, 1, 2, 3, 4]]
    assert label_groups(seqs, 2, 100) == [[0, 1], [2, 3], [4]]
    # nodes: [1],[1,2],[1,3] = 3; [1,4] would make 4
    assert label_groups(seqs, 10, 3) == [[0, 1], [2, 3], [4]]


def test_a_group_without_room_is_halved_and_the_scores_stay_the_same() -> None:
    prompt = [1, 2]
    want, _ = sequential(prompt, SEQS)
    dec = FakeTrieDecoder(prompt, room=4)
    got, _ = score_trie(dec, len(prompt), row_for(prompt), SEQS, 100, 100)
    assert got == want
    assert all(nodes <= 4 for nodes, _ in dec.calls)


def test_a_single_label_without_room_is_an_error() -> None:
    dec = FakeTrieDecoder([1], room=1)
    with pytest.raises(NoRoom):
        score_trie(dec, 1, row_for([1]), [[3, 4, 5, 0]], 10, 10)


def test_between_runs_before_every_group_but_the_first() -> None:
    ticks: list[int] = []
    dec = FakeTrieDecoder([1])
    score_trie(dec, 1, row_for([1]), SEQS, 2, 100, lambda: ticks.append(1))
    assert len(ticks) == len(dec.calls) - 1 > 0


def test_labels_of_one_token_and_identical_labels() -> None:
    prompt = [3]
    seqs = [[0], [4, 0], [4, 0], [4, 4, 0]]
    want, decoded = sequential(prompt, seqs)
    got, n = score_trie(FakeTrieDecoder(prompt), 1, row_for(prompt), seqs, 8, 8)
    assert got == want and n == decoded
    assert np.isfinite(got).all()
