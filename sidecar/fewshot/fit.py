"""Tuning a classifier on its own examples: leave-one-out evidence on a held-out sample.

Each held-out example is classified by all the others (it is excluded from its own
neighbours), so nothing is tuned on the answers it is judged by. Pure numpy, and fast
enough to run when a task loads: a 10k-example set fits in seconds.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import numpy.typing as npt

from sidecar.fewshot.classifier import (
    BANDWIDTHS,
    F64,
    ExampleClassifier,
    fit_weights,
    probe_logp,
    train_probe,
)
from sidecar.fewshot.novelty import calibrate

FOLDS = 5


def holdout(n: int, size: int, seed: int = 0) -> npt.NDArray[np.int64]:
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n)[: min(size, n)]).astype(np.int64)


def similarity_rows(
    clf: ExampleClassifier, idx: npt.NDArray[np.int64], texts: list[str]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    emb = clf.vectors[idx] @ clf.vectors.T
    lex = np.stack([clf.lexical.similarities(texts[i]) for i in idx])
    return emb, lex


def _best_bandwidth(
    clf: ExampleClassifier, sims: npt.NDArray[np.float32], idx: npt.NDArray[np.int64]
) -> float:
    best, best_loss = BANDWIDTHS[0], np.inf
    y = clf.y[idx]
    for h in BANDWIDTHS:
        ev = np.stack([clf.vote(sims[r], h, exclude=int(i)) for r, i in enumerate(idx)])
        loss = -float(ev[np.arange(len(idx)), y].mean())
        if loss < best_loss:
            best, best_loss = h, loss
    return best


def neighbour_evidence(
    clf: ExampleClassifier,
    idx: npt.NDArray[np.int64],
    emb: npt.NDArray[np.float32],
    lex: npt.NDArray[np.float32],
) -> F64:
    """(n, 2, labels) leave-one-out evidence for the held-out examples, from their
    similarity rows (`similarity_rows`)."""
    p = clf.params
    return np.stack(
        [
            np.stack(
                [
                    clf.vote(emb[r], p.emb_bandwidth, exclude=int(i)),
                    clf.vote(lex[r], p.lex_bandwidth, exclude=int(i)),
                ]
            )
            for r, i in enumerate(idx)
        ]
    )


def probe_evidence(clf: ExampleClassifier, idx: npt.NDArray[np.int64]) -> F64:
    """Cross-fitted probe evidence for the held-out rows: each fold's rows are predicted
    by a probe trained on every other example, never on themselves."""
    out = np.zeros((len(idx), clf.n_labels))
    folds = np.array_split(np.arange(len(idx)), min(FOLDS, len(idx)))
    for fold in folds:
        keep = np.ones(len(clf.y), bool)
        keep[idx[fold]] = False
        if len(np.unique(clf.y[keep])) < 2:
            continue  # too few examples to train on without these: no probe evidence
        w, b = train_probe(clf.vectors[keep], clf.y[keep], clf.n_labels)
        out[fold] = probe_logp(clf.vectors[idx[fold]], w, b)
    return out


def fit(
    clf: ExampleClassifier, texts: list[str], size: int = 2000
) -> tuple[npt.NDArray[np.int64], F64]:
    """Set the classifier's bandwidths, probe, weights and out-of-scope calibration
    (`novelty`); returns the held-out rows and their (n, 3, labels) evidence."""
    idx = holdout(len(texts), size)
    emb, lex = similarity_rows(clf, idx, texts)
    clf.params = replace(
        clf.params,
        emb_bandwidth=_best_bandwidth(clf, emb, idx),
        lex_bandwidth=_best_bandwidth(clf, lex, idx),
    )
    ev = np.concatenate(
        [neighbour_evidence(clf, idx, emb, lex), probe_evidence(clf, idx)[:, None, :]], axis=1
    )
    y = clf.y[idx]
    clf.probe = train_probe(clf.vectors, clf.y, clf.n_labels)
    clf.params = replace(
        clf.params, weights=fit_weights(ev, y), lex_alone=fit_weights(ev[:, 1:2, :], y)[0]
    )
    clf.params = replace(clf.params, gate=choose_gate(clf, ev, y))
    w = np.asarray(clf.params.weights)
    full = softmax_rows(np.einsum("v,nvl->nl", w[:3], ev[:, :3, :]))
    alone = softmax_rows(clf.params.lex_alone * ev[:, 1, :])
    clf.scope = calibrate(clf, texts, idx, emb, lex, full, alone)
    return idx, ev


def softmax_rows(z: F64) -> F64:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: F64 = e / e.sum(axis=-1, keepdims=True)
    return out


def choose_gate(
    clf: ExampleClassifier, ev: F64, y: npt.NDArray[np.int64], tolerance: float = 0.002
) -> float:
    """The lowest lexical-alone confidence above which answering without the model loses
    (on held-out examples) at most `tolerance` accuracy against the full combination."""
    w = np.asarray(clf.params.weights)
    full = softmax_rows(np.einsum("v,nvl->nl", w[:3], ev[:, :3, :]))
    alone = softmax_rows(clf.params.lex_alone * ev[:, 1, :])
    conf = alone.max(axis=1)
    ok_alone = alone.argmax(axis=1) == y
    ok_full = full.argmax(axis=1) == y
    gate = 2.0
    for t in np.unique(np.round(conf, 3))[::-1]:  # from the surest down
        sel = conf >= t
        if sel.sum() < 30:  # too few to judge: keep looking lower
            continue
        if ok_alone[sel].mean() + tolerance < ok_full[sel].mean():
            break
        gate = float(t)
    return gate
