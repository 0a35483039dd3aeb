"""Label scoring, the model's own view in a few-shot answer (tasks with `label_scoring`).

The worker scores a shortlist of the labels the examples make likely (a plain label
Classify); those log-probabilities join the examples' evidence with a weight fitted,
when the classifier is built, on held-out examples.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from sidecar.domain.errors import FailedPrecondition
from sidecar.domain.seam import Engine
from sidecar.domain.types import Classification, ClassifyTask
from sidecar.fewshot.classifier import F64, ExampleClassifier, fit_weights, label_evidence
from sidecar.fewshot.embedding import EMBED_CONCURRENCY, all_or_cancel
from sidecar.fewshot.examples import ExampleSet

SHORTLIST = 5
LABEL_HOLDOUT = 300  # held-out examples whose label scores tune the label-scoring weight


async def combine(
    engine: Engine,
    model: str,
    text: str,
    clf: ExampleClassifier,
    evidence: F64,
    scoring: bool,
    instruction: str,
    caller: str,
    *,
    background: bool = False,
    adapter: str = "",
) -> tuple[F64, Classification | None]:
    """Calibrated probabilities, and the label-scoring reply when the model scored labels."""
    if scoring and clf.params.shortlist:
        shortlist = clf.shortlist(evidence)
        scored = await _score(
            engine, model, text, clf, shortlist, instruction, caller, background, adapter
        )
        row = label_evidence(clf.n_labels, shortlist, _logprobs(scored, clf, shortlist))
        return clf.probabilities(np.vstack([evidence, row])), scored
    return clf.probabilities(evidence), None


async def fit_label_scoring(
    engine: Engine,
    model: str,
    clf: ExampleClassifier,
    examples: ExampleSet,
    instruction: str,
    idx: npt.NDArray[np.int64],
    ev: F64,
    caller: str,
    adapter: str = "",
) -> None:
    """The label-scoring view's weight, fitted on part of the same held-out rows."""
    clf.params = replace(clf.params, shortlist=min(SHORTLIST, clf.n_labels))
    held = np.arange(min(LABEL_HOLDOUT, len(idx)))
    sem = asyncio.Semaphore(EMBED_CONCURRENCY)

    async def row(r: int) -> F64:
        shortlist = clf.shortlist(ev[r])
        text = examples.texts[int(idx[r])]
        async with sem:
            scored = await _score(
                engine, model, text, clf, shortlist, instruction, caller, True, adapter
            )
        return label_evidence(clf.n_labels, shortlist, _logprobs(scored, clf, shortlist))

    rows = await all_or_cancel(row(int(r)) for r in held)
    full = np.concatenate([ev[held], np.asarray(rows)[:, None, :]], axis=1)
    clf.params = replace(clf.params, weights=fit_weights(full, clf.y[idx[held]]))


async def _score(
    engine: Engine,
    model: str,
    text: str,
    clf: ExampleClassifier,
    shortlist: list[int],
    instruction: str,
    caller: str,
    background: bool = False,
    adapter: str = "",
) -> Classification:
    labels = tuple(clf.names[i] for i in shortlist)
    r = await engine.run(
        model,
        ClassifyTask(text, labels, instruction, adapter=adapter),
        caller,
        background=background,
    )
    if not isinstance(r, Classification):  # pragma: no cover - an engine bug
        raise FailedPrecondition("label scoring returned no classification")
    return r


def _logprobs(scored: Classification, clf: ExampleClassifier, shortlist: list[int]) -> list[float]:
    by_label = {s.label: s.logprob for s in scored.scores}
    return [by_label[clf.names[i]] for i in shortlist]
