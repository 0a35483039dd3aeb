"""Per-token log-probabilities, each tied to the slice of the reply text its token made.

A token's text is what the incremental UTF-8 decoder released when the token was
fed, not the token decoded alone: a character split across tokens belongs to the token
that completes it, so the tokens' texts always concatenate to the reply text (cut at a
stop sequence, which may leave the last tokens with empty text). Streamed chunks carry
a token once the text it made has been released.
"""

from __future__ import annotations

import numpy as np

from sidecar.domain.types import TokenLogprob, TopLogprob
from sidecar.worker.labels import Row


def top_k(row: Row, k: int) -> list[tuple[int, float]]:
    """The k most likely token ids with their log-probabilities, most likely first."""
    k = min(k, row.shape[0])
    ids = np.argpartition(row, -k)[-k:]  # O(n_vocab), then sort only k
    ids = ids[np.argsort(-row[ids], kind="stable")]
    return [(int(i), float(row[i])) for i in ids]


class LogprobTrail:
    def __init__(self) -> None:
        self._data: list[bytes] = []
        self._logprob: list[float] = []
        self._top: list[tuple[TopLogprob, ...]] = []
        self._ends: list[int] = []  # offset in the text where each token's text ends
        self._given = 0  # how many tokens a stream chunk has carried

    def __len__(self) -> int:
        return len(self._data)

    def add(self, data: bytes, logprob: float, top: tuple[TopLogprob, ...], end: int) -> None:
        self._data.append(data)
        self._logprob.append(logprob)
        self._top.append(top)
        self._ends.append(end)

    def released(self, text: str, upto: int) -> tuple[TokenLogprob, ...]:
        """Tokens not yet handed out whose text lies within text[:upto]."""
        n = self._given
        while n < len(self._ends) and self._ends[n] <= upto:
            n += 1
        out = tuple(self._entry(i, text, upto) for i in range(self._given, n))
        self._given = n
        return out

    def rest(self, text: str) -> tuple[TokenLogprob, ...]:
        """At the end: every token not handed out yet (the last takes any flushed tail)."""
        out = tuple(self._entry(i, text) for i in range(self._given, len(self._data)))
        self._given = len(self._data)
        return out

    def all(self, text: str) -> tuple[TokenLogprob, ...]:
        return tuple(self._entry(i, text) for i in range(len(self._data)))

    def _entry(self, i: int, text: str, upto: int | None = None) -> TokenLogprob:
        limit = len(text) if upto is None else upto
        start = min(self._ends[i - 1] if i else 0, limit)
        last = i == len(self._data) - 1 and upto is None
        end = limit if last else min(self._ends[i], limit)
        return TokenLogprob(text[start:end], self._data[i], self._logprob[i], self._top[i])
