"""Classify by labelled examples: evidence from several views, combined and calibrated.

Views: the k nearest examples by the model's own mean-pooled embedding (centred on the
examples' mean, which removes the direction every text of a small decoder shares) and by
a lexical TF-IDF view, each voting with similarity weights; a linear softmax probe on the
embedding (far stronger than neighbours on a small model's features); and, optionally,
the model's label scoring over a shortlist. A view's evidence is log P(label), smoothed
so no label is impossible.

The combined logit is sum(weight_v * evidence_v). The weights are fitted on held-out
examples (leave-one-out) by minimising log loss, which both picks how much to trust each
view and calibrates: the reply's top probability is then a probability, and a threshold
on it means what it says. See `fit`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from sidecar.fewshot.gauss import Gaussians
from sidecar.fewshot.lexical import LexicalIndex

if TYPE_CHECKING:
    from sidecar.fewshot.novelty import Scope

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
SMOOTH = 0.02  # share of probability spread evenly over all labels in a view's vote
BANDWIDTHS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


@dataclass(frozen=True)
class Params:
    k: int = 10
    emb_bandwidth: float = 0.05
    lex_bandwidth: float = 0.1
    weights: tuple[float, ...] = (1.0, 1.0, 0.0)  # emb kNN, lex kNN, probe[, label scoring]
    shortlist: int = 0  # label scoring over this many top labels; 0 = off
    lex_alone: float = 1.0  # the lexical view's weight when it answers alone
    gate: float = 2.0  # lexical-alone confidence from which the model is skipped; > 1 = never


def center(vectors: F32, mean: F32) -> F32:
    v = vectors - mean
    out: F32 = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)
    return out


class ExampleClassifier:
    def __init__(
        self,
        labels: Sequence[str],
        vectors: F32,
        texts: Sequence[str],
        none_vectors: F32 | None = None,
        none_texts: Sequence[str] = (),
    ) -> None:
        self.names = tuple(dict.fromkeys(labels))
        index = {n: i for i, n in enumerate(self.names)}
        self.y = np.array([index[label] for label in labels], np.int64)
        self.mean = vectors.mean(axis=0).astype(np.float32)
        self.vectors = center(vectors.astype(np.float32), self.mean)
        self.lexical = LexicalIndex(texts)
        self.params = Params(k=min(10, len(labels) - 1))
        self.probe: tuple[F32, F32] | None = None  # (W, b) over centred embeddings
        # Out-of-scope examples (never a label) and the calibration of the novelty signal.
        self.none_vectors: F32 | None = None
        self.none_lexical: LexicalIndex | None = None
        if none_vectors is not None and len(none_texts):
            self.none_vectors = center(none_vectors.astype(np.float32), self.mean)
            self.none_lexical = LexicalIndex(none_texts)
        self.gauss = Gaussians(self.vectors, self.y)  # the relative Mahalanobis distance
        self.scope: Scope | None = None

    @property
    def n_labels(self) -> int:
        return len(self.names)

    def vote(self, sims: F32, bandwidth: float, exclude: int | None = None) -> F64:
        """log P(label) from the k most similar examples."""
        k = self.params.k
        if exclude is not None:
            sims = sims.copy()
            sims[exclude] = -np.inf
        top = np.argpartition(-sims, k - 1)[:k] if k < len(sims) else np.arange(len(sims))
        s = sims[top].astype(np.float64)
        w = np.exp((s - s.max()) / bandwidth)
        votes = np.bincount(self.y[top], weights=w, minlength=self.n_labels)
        p = (1 - SMOOTH) * votes / votes.sum() + SMOOTH / self.n_labels
        out: F64 = np.log(p)
        return out

    def similarities(self, vector: F32) -> tuple[F32, F32]:
        """(the centred query, its cosine to every example) in the embedding view."""
        x = center(vector.astype(np.float32), self.mean)
        emb: F32 = self.vectors @ x
        return x, emb

    def evidence(
        self,
        vector: F32,
        text: str,
        exclude: int | None = None,
        lex: F32 | None = None,
        emb: F32 | None = None,
    ) -> F64:
        """Per view, log P(label): shape (3, n_labels) (the probe row is 0 without a probe)."""
        x = center(vector.astype(np.float32), self.mean)
        if emb is None:
            emb = self.vectors @ x
        if lex is None:
            lex = self.lexical.similarities(text)
        p = self.params
        probe = probe_logp(x, *self.probe) if self.probe is not None else np.zeros(self.n_labels)
        return np.stack(
            [
                self.vote(emb, p.emb_bandwidth, exclude),
                self.vote(lex, p.lex_bandwidth, exclude),
                probe,
            ]
        )

    def lexical_probabilities(self, lex: F32, exclude: int | None = None) -> F64:
        """Calibrated P(label) from the words alone (the cascade's first, model-free step)."""
        z = self.params.lex_alone * self.vote(lex, self.params.lex_bandwidth, exclude)
        z = z - z.max()
        p: F64 = np.exp(z) / np.exp(z).sum()
        return p

    def shortlist(self, evidence: F64) -> list[int]:
        """The labels worth scoring with the model: the best by the neighbour views."""
        w = np.asarray(self.params.weights[:3])
        z = w @ evidence[:3]
        return [int(i) for i in np.argsort(-z)[: self.params.shortlist]]

    def probabilities(self, evidence: F64) -> F64:
        """Calibrated P(label): evidence rows beyond the weights given are ignored."""
        w = np.asarray(self.params.weights)
        z = w @ evidence[: len(w)]
        z = z - z.max()
        p: F64 = np.exp(z) / np.exp(z).sum()
        return p


def train_probe(
    x: F32, y: npt.NDArray[np.int64], n_labels: int, l2: float = 1e-5, steps: int = 300
) -> tuple[F32, F32]:
    """Multinomial logistic regression by full-batch Adam (numpy only; ~6 s on 10k x 576).

    The light L2 term was chosen on a train.csv-only split of Banking77; the probe's
    calibration comes later, from its fitted weight in the combination.
    """
    n, d = x.shape
    w = np.zeros((d, n_labels), np.float32)
    b = np.zeros(n_labels, np.float32)
    onehot = np.eye(n_labels, dtype=np.float32)[y]
    moments = [(np.zeros_like(w), np.zeros_like(w)), (np.zeros_like(b), np.zeros_like(b))]
    lr, b1, b2 = 0.05, 0.9, 0.999
    for t in range(1, steps + 1):
        z = x @ w + b
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        g = (p - onehot) / n
        grads = (x.T @ g + l2 * w, g.sum(axis=0))
        for param, grad, (m, v) in zip((w, b), grads, moments, strict=True):
            m *= b1
            m += (1 - b1) * grad
            v *= b2
            v += (1 - b2) * grad * grad
            param -= lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + 1e-8)
    return w, b


def probe_logp(x: F32, w: F32, b: F32) -> F64:
    z = (x @ w + b).astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    out: F64 = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return out


def label_evidence(n_labels: int, shortlist: Sequence[int], logprobs: Sequence[float]) -> F64:
    """The model's label scores as a view: normalised over the shortlist, a floor elsewhere."""
    lp = np.asarray(logprobs, np.float64)
    lp = lp - lp.max()
    lp = lp - np.log(np.exp(lp).sum())
    out = np.full(n_labels, lp.min() - 1.0)
    out[list(shortlist)] = lp
    return out


def fit_weights(evidence: F64, y: npt.NDArray[np.int64], steps: int = 400) -> tuple[float, ...]:
    """Weights minimising the mean log loss of softmax(sum_v w_v * evidence[:, v]).

    evidence: (n, views, labels). Convex in w, so plain gradient descent with a
    backtracking step finds the optimum; weights stay >= 0 (a view never counts against
    its own vote).
    """
    n, views, _ = evidence.shape
    w = np.ones(views)

    def loss_grad(w: F64) -> tuple[float, F64]:
        z = np.einsum("v,nvl->nl", w, evidence)
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        p = np.exp(logp)
        loss = -float(logp[np.arange(n), y].mean())
        # d loss / d w_v = mean over n of (E_p[e_v] - e_v[y])
        expected = np.einsum("nl,nvl->nv", p, evidence)
        actual = evidence[np.arange(n), :, y]
        return loss, (expected - actual).mean(axis=0)

    loss, grad = loss_grad(w)
    step = 1.0
    for _ in range(steps):
        cand = np.maximum(w - step * grad, 0.0)
        c_loss, c_grad = loss_grad(cand)
        if c_loss <= loss:
            w, loss, grad = cand, c_loss, c_grad
            step *= 1.5
        else:
            step *= 0.5
            if step < 1e-8:
                break
    return tuple(float(x) for x in w)
