"""Tying token log-probabilities to the text their tokens made (split characters, stop cuts)."""

from __future__ import annotations

import numpy as np

from sidecar.worker.logprobs import LogprobTrail, top_k
from sidecar.worker.text import TextAssembler


def feed(tokens: list[bytes], stop: tuple[str, ...] = ()) -> tuple[str, list[tuple[str, int]]]:
    """Stream tokens as the runner does; return the text and (chunk text, tokens) pairs."""
    text, trail, chunks = TextAssembler(stop), LogprobTrail(), []
    for i, data in enumerate(tokens):
        piece = text.feed(data)
        trail.add(data, -float(i), (), len(text.text))
        if piece:
            chunks.append((piece, [t.token for t in trail.released(text.text, text.released)]))
        if text.stopped:
            break
    tail = text.finish()
    rest = trail.rest(text.text)
    if tail or rest:
        chunks.append((tail, [t.token for t in rest]))
    assert "".join(t.token for t in trail.all(text.text)) == text.text
    return text.text, [(c, len(toks)) for c, toks in chunks]


def test_a_character_split_across_tokens_belongs_to_the_token_that_completes_it() -> None:
    e = "é".encode()
    text, chunks = feed([b"a", e[:1], e[1:], b"b"])
    assert text == "aéb"
    assert chunks == [("a", 1), ("é", 2), ("b", 1)]


def test_tokens_held_back_for_a_stop_sequence_go_with_the_text_that_releases_them() -> None:
    text, chunks = feed([b"x", b"E", b"y", b"E", b"N", b"D", b"z"], stop=("END",))
    assert text == "xEy"
    # Two characters wait (they may start END), so each token's text is released, with
    # its log-probability, two tokens late; the stop sequence's tokens come last, textless.
    assert chunks == [("x", 1), ("E", 1), ("y", 1), ("", 3)]


def test_top_k_is_sorted_and_exact() -> None:
    row = np.log(np.array([0.1, 0.4, 0.05, 0.3, 0.15], dtype=np.float32))
    assert [i for i, _ in top_k(row, 3)] == [1, 3, 4]
    assert [i for i, _ in top_k(row, 9)] == [1, 3, 4, 0, 2]
