"""Out of scope: how unlike a text is to everything the examples cover, as a conformal p-value.

The calibrated confidence says which label is likeliest *among the labels*; a question that
belongs to none of them still gets one, often confidently. Users rarely have examples of
what is out of scope, so the signal is built from the in-scope examples alone:

- nonconformity features of a text (higher = stranger; `features`);
- each feature is compared with the same feature of held-out in-scope examples (the fit's
  leave-one-out sample, each judged by all the other examples): the feature's conformal
  p-value is (1 + #{held-out >= s}) / (n + 1);
- the features' p-values are combined by Fisher's method (-sum log p), and that statistic
  gets its own conformal p-value against the held-out examples' statistics. `novelty` is
  1 - p; the text is out of scope when p < the task's `scope_alpha`.

Which features (chosen on Banking77 train.csv, SmolLM2-135M vectors, 10 intents left out
per draw, their rows the out-of-scope queries; AUROCs in docs/development.md "Out of
scope on Banking77"): with the model, the relative Mahalanobis distance (`gauss`), the
nearest example in the lexical view and the classifier's top probability. The relative
Mahalanobis distance was the strongest single signal among the confident answers (the
only ones the cut matters for: the others escalate anyway), where the nearest-example
cosine and the predicted label's nearest examples were weak; the lexical nearest example
and the confidence add what it misses. Fisher's method needs no weights (there are no
out-of-scope examples to fit them on), and the final conformal step keeps p honest: for an
in-scope text exchangeable with the held-out examples, P(p < alpha) <= alpha, so
`scope_alpha` is the share of in-scope texts one accepts to lose.

Answers from the words alone (the cascade) have no embedding: their p-value uses the
lexical nearest example and the words-alone confidence, against the same held-out rows.

A small example set has a small held-out sample: with n held-out examples p is never below
1/(n + 1), so a set of fewer than 1/alpha - 1 examples can never answer "out of scope" at
level alpha (19 examples at 0.05). That is the honest answer: with so few examples nothing
can be called strange with that confidence.

Out-of-scope examples (a task's `none_label` rows, or its `none_file`) never become a
label: a text nearer an out-of-scope example than any in-scope one (embedding view; the
lexical view for words-alone answers) is out of scope whatever its p-value. As a further
Fisher feature they lowered the AUROC (the out-of-scope questions that come are rarely the
ones given as examples), so they decide only by that nearest-neighbour rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from sidecar.fewshot.classifier import F32, F64, ExampleClassifier

# Feature columns. EMB_NN and EMB_LABEL are candidates measured when choosing (not in the
# statistic); EMB_NN is also what an out-of-scope example must beat (NONE_EMB).
EMB_NN, EMB_LABEL, LEX_NN, CONF, LEX_CONF, NONE_EMB, NONE_LEX, REL_MAHA = range(8)
N_FEATURES = 8
MODEL_FEATURES = (REL_MAHA, LEX_NN, CONF)  # answers that used the model
WORDS_FEATURES = (LEX_NN, LEX_CONF)  # answers from the words alone
LABEL_TOP = 3  # the predicted label's nearest examples that `EMB_LABEL` averages
DEFAULT_ALPHA = 0.05


class Scope:
    """The calibration: the held-out in-scope examples' features, and the statistic each
    kind of answer (with the model, from the words alone) is judged by."""

    def __init__(self, held_out: F64, with_none: bool = False) -> None:
        # with_none: the task has out-of-scope examples (NONE_EMB, NONE_LEX are measured).
        self.features = held_out  # (n, N_FEATURES): one row per held-out example
        self.with_none = with_none
        self._stats = {
            w: fisher(held_out_p_values(held_out[:, self.columns(w)])) for w in (False, True)
        }

    @property
    def n(self) -> int:
        return int(self.features.shape[0])

    def columns(self, words_only: bool) -> list[int]:
        return list(WORDS_FEATURES if words_only else MODEL_FEATURES)

    def p_value(self, row: F64, words_only: bool) -> float:
        """The conformal p-value of one text's features (1 = typical, small = strange)."""
        cols = self.columns(words_only)
        stat = fisher(p_values(self.features[:, cols], row[cols]))
        return conformal(self._stats[words_only], float(stat))

    def nearest_is_none(self, row: F64, words_only: bool) -> bool:
        """The text is nearer an out-of-scope example than any in-scope one."""
        gap = row[NONE_LEX if words_only else NONE_EMB]
        return self.with_none and bool(np.isfinite(gap) and gap > 0)


@dataclass(frozen=True)
class Verdict:
    novelty: float  # 1 - p
    p: float  # the conformal p-value
    nearest_is_none: bool  # nearer an out-of-scope example than any in-scope one

    def out_of_scope(self, alpha: float) -> bool:
        return self.p < alpha or self.nearest_is_none


def conformal(calibration: F64, score: float) -> float:
    """(1 + #{calibration >= score}) / (n + 1): higher scores are stranger."""
    n = len(calibration)
    return float((1 + np.count_nonzero(calibration >= score)) / (n + 1))


def p_values(calibration: F64, row: F64) -> F64:
    """Per column, the conformal p-value of `row` against the calibration rows."""
    n = calibration.shape[0]
    out: F64 = (1 + (calibration >= row[None, :]).sum(axis=0)) / (n + 1)
    return out


def held_out_p_values(calibration: F64) -> F64:
    """Each calibration row's p-values against all the other rows (leave-one-out):
    (1 + #{others >= s}) / n, through ranks (ties count as >=)."""
    n = calibration.shape[0]
    out = np.empty_like(calibration)
    for c in range(calibration.shape[1]):
        col = calibration[:, c]
        ordered = np.sort(col)
        # #{j: s_j >= s_i}, itself included: the 1 + #{others >= s}.
        out[:, c] = (n - np.searchsorted(ordered, col, side="left")) / max(n, 1)
    return out


def fisher(p: F64) -> F64:
    """Fisher's statistic -sum log p over the last axis: higher = stranger."""
    out: F64 = -np.log(np.clip(p, 1e-12, 1.0)).sum(axis=-1)
    return out


def features(
    y: npt.NDArray[np.int64],
    emb: F32 | None,
    lex: F32,
    probs: F64 | None,
    *,
    lex_probs: F64 | None = None,
    exclude: int | None = None,
    none_emb: F32 | None = None,
    none_lex: F32 | None = None,
    rel_maha: float | None = None,
) -> F64:
    """One text's nonconformity features (higher = stranger); NaN where not measured.

    emb, lex: its similarity to every example (embedding and lexical views); probs: the
    classifier's calibrated label probabilities (None: the words alone answered, with
    `lex_probs`); exclude: its own row (held-out examples);
    none_emb, none_lex: its similarity to each out-of-scope example; rel_maha: its relative
    Mahalanobis distance (`gauss`).
    """
    out = np.full(N_FEATURES, np.nan)
    if rel_maha is not None:
        out[REL_MAHA] = rel_maha
    if exclude is not None:
        lex = lex.copy()
        lex[exclude] = -np.inf
    lex_nn = float(lex.max())
    out[LEX_NN] = -lex_nn
    if probs is not None:
        out[CONF] = -float(probs.max())
    if lex_probs is not None:
        out[LEX_CONF] = -float(lex_probs.max())
    best = probs if probs is not None else lex_probs
    if emb is not None and best is not None:
        if exclude is not None:
            emb = emb.copy()
            emb[exclude] = -np.inf
        emb_nn = float(emb.max())
        out[EMB_NN] = -emb_nn
        mine = emb[y == int(np.argmax(best))]
        mine = mine[np.isfinite(mine)]
        if len(mine):
            top = np.sort(mine)[-LABEL_TOP:]
            out[EMB_LABEL] = -float(top.mean())
        if none_emb is not None and len(none_emb):
            out[NONE_EMB] = float(none_emb.max()) - emb_nn
    if none_lex is not None and len(none_lex):
        out[NONE_LEX] = float(none_lex.max()) - lex_nn
    return out


def novelty_of(
    clf: ExampleClassifier,
    text: str,
    lex: F32,
    *,
    probs: F64 | None = None,
    lex_probs: F64 | None = None,
    x: F32 | None = None,
    emb: F32 | None = None,
) -> Verdict | None:
    """How novel a text is (None: the classifier has no calibration).

    With the model: `x` (the centred query), `emb` and `probs`; from the words alone:
    `lex_probs` only."""
    if clf.scope is None:
        return None
    none_emb = clf.none_vectors @ x if clf.none_vectors is not None and x is not None else None
    none_lex = clf.none_lexical.similarities(text) if clf.none_lexical is not None else None
    rel = clf.gauss.relative(x) if x is not None else None
    row = features(
        clf.y,
        emb,
        lex,
        probs,
        lex_probs=lex_probs,
        none_emb=none_emb,
        none_lex=none_lex,
        rel_maha=rel,
    )
    words_only = emb is None
    p = clf.scope.p_value(row, words_only)
    return Verdict(1.0 - p, p, clf.scope.nearest_is_none(row, words_only))


def calibrate(
    clf: ExampleClassifier,
    texts: Sequence[str],
    idx: npt.NDArray[np.int64],
    emb: F32,
    lex: F32,
    full: F64,
    alone: F64,
) -> Scope:
    """The held-out examples' features, each judged by all the other examples.

    idx: the held-out rows; emb, lex: their similarity rows; full, alone: their
    leave-one-out probabilities with the model and from the words alone."""
    rows = []
    for r, i in enumerate(idx):
        none_emb = clf.none_vectors @ clf.vectors[i] if clf.none_vectors is not None else None
        none_lex = clf.none_lexical.similarities(texts[i]) if clf.none_lexical is not None else None
        rows.append(
            features(
                clf.y,
                emb[r],
                lex[r],
                full[r],
                lex_probs=alone[r],
                exclude=int(i),
                none_emb=none_emb,
                none_lex=none_lex,
                rel_maha=clf.gauss.relative(clf.vectors[i], own=int(clf.y[i])),
            )
        )
    return Scope(np.array(rows), with_none=clf.none_vectors is not None)
