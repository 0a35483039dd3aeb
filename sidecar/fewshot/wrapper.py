"""FewShotEngine: Classify by labelled examples, as an engine wrapping an engine.

A Classify that carries `examples` or names a config `task` is answered here; every
other request passes straight to the inner engine (the local pool). The examples are
embedded once by the model's own workers and cached (see `builds`); a request then
costs one Embed of its text, or nothing when the words alone are as sure as the fitted
cascade gate. Its reply carries, like any other, the model (name@version) that
embedded the text (or the examples, when the words alone answered) and its timings:
`queue_ms` is what this request's own jobs waited for a worker, and a classification
being one answer, `first_token_ms` is `total_ms`.

Every reply also says how novel the text is (`novelty`, 1 - a conformal p-value against
held-out examples, see `novelty`) and whether that makes it out of scope (p below the
task's `scope_alpha`; request examples use the default). When the request allows "none
of these" (`allow_none`), an out-of-scope reply has no label (the scores stay listed).

Config tasks are embedded in the background after start (`prepare`); what preparing
each has reached is in `progress` (shown by `sidecar status`). A task's threshold and
scope_alpha are live on SIGHUP (`retune`); anything else changed in a task needs a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from sidecar.config import TaskConfig
from sidecar.domain.errors import FailedPrecondition, InvalidRequest, SidecarError
from sidecar.domain.seam import DEFAULT_ROUTE, Engine, EngineWrapper
from sidecar.domain.types import (
    Classification,
    ClassifyTask,
    GenerateTask,
    LabelScore,
    Result,
    RouteRequest,
    Task,
    Timings,
    Usage,
)
from sidecar.fewshot.builds import Builds
from sidecar.fewshot.classifier import F32, F64, ExampleClassifier
from sidecar.fewshot.embedding import Embedder
from sidecar.fewshot.examples import ExampleSet, check
from sidecar.fewshot.novelty import DEFAULT_ALPHA, novelty_of
from sidecar.fewshot.scoring import combine
from sidecar.fewshot.vectors import VectorCache
from sidecar.validate import MAX_LABEL_CHARS

log = logging.getLogger("sidecar.fewshot")

MAX_REQUEST_EXAMPLES = 2000


def by_examples(task: Task) -> bool:
    """A Classify this wrapper answers (the rest goes to the inner engine)."""
    return isinstance(task, ClassifyTask) and bool(task.examples or task.task)


class FewShotEngine(EngineWrapper):
    def __init__(
        self,
        inner: Engine,
        cache_dir: Path,
        tasks: tuple[TaskConfig, ...],
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        super().__init__(inner)
        self._tasks = {t.name: t for t in tasks}
        self._clock = clock
        self.embedder = Embedder(inner)
        self.builds = Builds(inner, self.embedder, VectorCache(cache_dir))

    # ------------------------------------------------------------------ the seam

    def check(self, model: str, task: Task) -> None:
        """A config task was checked when the config was read; request examples here."""
        if not isinstance(task, ClassifyTask) or not by_examples(task):
            self.inner.check(model, task)
        elif not task.task:
            _check_examples(task)

    async def run(
        self,
        model: str,
        task: Task,
        caller: str,
        *,
        route: RouteRequest = DEFAULT_ROUTE,
        background: bool = False,
    ) -> Result:
        if isinstance(task, ClassifyTask) and by_examples(task):
            if not task.text:
                raise InvalidRequest("text is empty: send the text to classify")
            return await self._classify(model, task, caller, background)
        return await self.inner.run(model, task, caller, route=route, background=background)

    # ------------------------------------------------------------------ config tasks

    @property
    def tasks(self) -> Mapping[str, TaskConfig]:
        return types.MappingProxyType(self._tasks)

    @property
    def progress(self) -> Mapping[str, str]:
        """Task name -> how far preparing it has got ("ready", "failed: ...")."""
        return types.MappingProxyType(self.builds.progress)

    def label_names(self, task: str) -> list[str]:
        """A config task's labels; empty until its examples file has been read."""
        return list(self.builds.labels(task))

    def threshold(self, task: str) -> float | None:
        """The task's own confidence threshold; None: unknown, or unset (-1)."""
        spec = self._tasks.get(task)
        return spec.threshold if spec is not None and spec.threshold >= 0 else None

    def target_accuracy(self, task: str) -> float | None:
        """The accuracy the task's threshold is chosen for from shadow traffic; None: off."""
        spec = self._tasks.get(task)
        return spec.target_accuracy if spec is not None and spec.target_accuracy > 0 else None

    def adapter(self, task: str) -> str:
        """The LoRA adapter a config task's answers run with (its label scoring's); "" = none."""
        spec = self._tasks.get(task)
        return spec.adapter if spec is not None and spec.label_scoring else ""

    def scope_alpha(self, task: str) -> float | None:
        """The task's out-of-scope cut; None: no such task."""
        spec = self._tasks.get(task)
        return spec.scope_alpha if spec is not None else None

    def retune(self, tasks: tuple[TaskConfig, ...]) -> None:
        """SIGHUP: thresholds, target accuracies and scope cuts are read per request; the
        rest of a task needs a restart."""
        for t in tasks:
            if t.name in self._tasks:
                self._tasks[t.name] = replace(
                    self._tasks[t.name],
                    threshold=t.threshold,
                    target_accuracy=t.target_accuracy,
                    scope_alpha=t.scope_alpha,
                )

    async def prepare(self) -> None:
        """Build every config task's classifier (a background task after start)."""
        for name, spec in self._tasks.items():
            try:
                await self.builds.for_task(spec, wait=True)
            except SidecarError as e:
                self.builds.progress[name] = f"failed: {e.message}"
                log.error("task %s: %s", name, e.message)

    # ------------------------------------------------------------------ classify

    async def _classify(
        self, model: str, task: ClassifyTask, caller: str, background: bool = False
    ) -> Classification:
        started = self._clock()
        if task.task:
            spec = self._tasks.get(task.task)
            if spec is None:
                known = ", ".join(sorted(self._tasks)) or "none configured"
                raise InvalidRequest(f"no task named {task.task!r} (known: {known})")
            if task.examples:
                raise InvalidRequest("give examples or a task name, not both")
            model = spec.model or model
            if task.adapter and not spec.label_scoring:
                raise FailedPrecondition(
                    f"task {spec.name!r} answers from embeddings of the bare model (no label "
                    f"scoring), so adapter {task.adapter!r} would change nothing: set "
                    f"tasks.{spec.name}.label_scoring = true, or send no adapter"
                )
            # The task's own adapter is its label scoring's (and its eval gate's): without
            # label scoring no answer runs with it, and the reply names none.
            adapter = (task.adapter or spec.adapter) if spec.label_scoring else ""
            built = await self.builds.for_task(spec, wait=False)
            instruction = task.instruction or spec.instruction
            scoring, cascade, alpha = spec.label_scoring, spec.cascade, spec.scope_alpha
        else:
            if task.adapter:  # never a silent answer without it
                raise InvalidRequest(
                    "Classify by examples answers from embeddings of the bare model, which an "
                    f"adapter does not change: send adapter {task.adapter!r} with labels "
                    "alone (zero-shot), or with a config task that has label_scoring"
                )
            examples = _check_examples(task)
            built = await self.builds.for_examples(model, examples, caller)
            instruction, scoring, cascade, alpha = task.instruction, False, True, DEFAULT_ALPHA
            adapter = ""
        clf = built.clf
        if task.labels:
            unknown = sorted(set(task.labels) - set(clf.names))
            if unknown:
                raise InvalidRequest(
                    f"label {unknown[0]!r} has no examples (labels with examples: "
                    f"{', '.join(clf.names[:10])}{'...' if len(clf.names) > 10 else ''})"
                )
        if adapter:  # NOT_FOUND even when the words alone answer and no model runs
            self.inner.check(model, GenerateTask(task.text, 1, adapter=adapter))
        scored: Classification | None = None
        lex = await asyncio.to_thread(clf.lexical.similarities, task.text)
        usage = Usage(0, 0)
        ref, queue_ms = built.ref, 0.0
        probs = clf.lexical_probabilities(lex)
        # The cascade: where the words alone are as sure as the fitted gate, the model's
        # embedding would not change the answer (checked on held-out examples), so it
        # is not computed. Everything else gets the model.
        if not cascade or probs.max() < clf.params.gate:
            emb, embedded = await self.embedder.one(model, task.text, caller, background)
            usage = Usage(embedded.usage.prompt_tokens, 0)  # 0 = answered without the model
            ref, queue_ms = embedded.model or ref, embedded.timings.queue_ms
            x, sims, evidence = await asyncio.to_thread(_evidence, clf, emb[0], task.text, lex)
            probs, scored = await combine(self.inner, model, task.text, clf, evidence, scoring,
                                          instruction, caller, background=background,
                                          adapter=adapter)  # fmt: skip
            if scored is not None:
                usage.prompt_tokens += scored.usage.prompt_tokens
                queue_ms += scored.timings.queue_ms
            verdict = novelty_of(clf, task.text, lex, probs=probs, x=x, emb=sims)
        else:
            verdict = novelty_of(clf, task.text, lex, lex_probs=probs)
        out_of_scope = verdict is not None and verdict.out_of_scope(alpha)
        novelty = verdict.novelty if verdict is not None else None
        allowed = (
            [clf.names.index(label) for label in task.labels]
            if task.labels
            else range(clf.n_labels)
        )
        p = np.array([probs[i] for i in allowed])
        p = p / p.sum()
        names = [clf.names[i] for i in allowed]
        order = np.argsort(-p)
        scores = tuple(
            LabelScore(names[i], float(p[i]), float(np.log(max(p[i], 1e-300)))) for i in order
        )
        total_ms = (self._clock() - started) * 1000
        timings = Timings(queue_ms=queue_ms, first_token_ms=total_ms, total_ms=total_ms)
        label = "" if out_of_scope and task.allow_none else scores[0].label
        return Classification(
            label,
            scores,
            usage,
            model=ref,
            timings=timings,
            novelty=novelty,
            out_of_scope=out_of_scope,
            adapter=scored.adapter if scored is not None else None,
        )


def _evidence(clf: ExampleClassifier, vector: F32, text: str, lex: F32) -> tuple[F32, F32, F64]:
    """(the centred query, its similarity to each example, the views' evidence)."""
    x, sims = clf.similarities(vector)
    return x, sims, clf.evidence(vector, text, None, lex, sims)


def _check_examples(task: ClassifyTask) -> ExampleSet:
    """Bound a request's examples before anything is embedded (or sent to the cloud)."""
    examples = ExampleSet(tuple(t for t, _ in task.examples), tuple(y for _, y in task.examples))
    if any("\x00" in y for y in examples.labels):
        raise InvalidRequest("an example label may not contain the character NUL (\\x00)")
    check(examples, MAX_REQUEST_EXAMPLES)
    for label in examples.label_names:
        if len(label) > MAX_LABEL_CHARS:
            raise InvalidRequest(
                f"example label {label[:40]!r}... is {len(label)} characters; "
                f"at most {MAX_LABEL_CHARS}"
            )
    return examples
