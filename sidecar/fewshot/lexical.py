"""A lexical view of the examples: TF-IDF over words, word pairs and character 4-grams.

Small models embed short texts coarsely; the words themselves separate many intents the
embedding blurs ("top up" vs "transfer"). Similarities are computed through an inverted
index, so a query touches only the examples that share a feature with it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import numpy.typing as npt

_WORD = re.compile(r"[a-z0-9']+")


def features(text: str) -> Counter[str]:
    low = text.lower()
    words = _WORD.findall(low)
    feats = Counter(words)
    feats.update(f"{a} {b}" for a, b in pairwise(words))
    padded = f" {' '.join(words)} "
    feats.update("#" + padded[i : i + 4] for i in range(len(padded) - 3))
    return feats


class LexicalIndex:
    def __init__(self, texts: Sequence[str], min_df: int = 2) -> None:
        docs = [features(t) for t in texts]
        df: Counter[str] = Counter(f for d in docs for f in d)
        if len(texts) < 50:  # tiny sets: every feature counts
            min_df = 1
        self.vocab = {f: i for i, f in enumerate(sorted(k for k, v in df.items() if v >= min_df))}
        n = len(texts)
        self.idf = np.zeros(len(self.vocab), np.float32)
        for f, i in self.vocab.items():
            self.idf[i] = np.log((1 + n) / (1 + df[f])) + 1.0
        self.n = n
        rows: list[list[tuple[int, float]]] = [[] for _ in self.vocab]
        for r, d in enumerate(docs):
            idx, val = self._weights(d)
            for i, v in zip(idx, val, strict=True):
                rows[i].append((r, v))
        # Postings as flat arrays: feature i's entries are [start[i], start[i+1]).
        self.start = np.zeros(len(self.vocab) + 1, np.int64)
        self.start[1:] = np.cumsum([len(p) for p in rows])
        self.doc = np.fromiter((r for p in rows for r, _ in p), np.int32, int(self.start[-1]))
        self.val = np.fromiter((v for p in rows for _, v in p), np.float32, int(self.start[-1]))

    def _weights(self, feats: Counter[str]) -> tuple[list[int], npt.NDArray[np.float32]]:
        idx = [self.vocab[f] for f in feats if f in self.vocab]
        if not idx:
            return [], np.zeros(0, np.float32)
        val = (
            np.array([1.0 + np.log(feats[f]) for f in feats if f in self.vocab], np.float32)
            * self.idf[idx]
        )
        val /= np.linalg.norm(val)
        return idx, val

    def similarities(self, text: str) -> npt.NDArray[np.float32]:
        """Cosine similarity of the text to every example (0 where nothing is shared)."""
        idx, val = self._weights(features(text))
        if not idx:
            return np.zeros(self.n, np.float32)
        spans = [(int(self.start[i]), int(self.start[i + 1])) for i in idx]
        docs = np.concatenate([self.doc[a:b] for a, b in spans])
        weights = np.concatenate([self.val[a:b] * v for (a, b), v in zip(spans, val, strict=True)])
        return np.bincount(docs, weights=weights, minlength=self.n).astype(np.float32)
