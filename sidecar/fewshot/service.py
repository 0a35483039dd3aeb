"""Example-based Classify inside the daemon: embed once, cache on disk, answer in milliseconds.

A request's examples (or a config task's CSV) are embedded by the model's own workers
once; the vectors are cached under the store by the content hash of the examples and
the model version (a hot swap changes the version, so the new model re-embeds). The
classifier is tuned on its examples (see `fit`) when it is built, and its tuned
parameters are cached beside the vectors.

Config tasks are prepared in the background at start; a request that arrives before
its task is ready gets UNAVAILABLE saying how far preparation has got (in AUTO that is a
local failure, so the cloud answers it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sidecar.config import TaskConfig
from sidecar.errors import FailedPrecondition, InvalidRequest, SidecarError, Unavailable
from sidecar.fewshot import fit as fitting
from sidecar.fewshot.classifier import (
    F32,
    F64,
    ExampleClassifier,
    Params,
    fit_weights,
    label_evidence,
)
from sidecar.fewshot.examples import ExampleSet, check, load_csv
from sidecar.types import (
    Classification,
    ClassifyTask,
    Embeddings,
    EmbedTask,
    LabelScore,
    Result,
    Task,
    Usage,
)

log = logging.getLogger("sidecar.fewshot")

Run = Callable[[str, Task, str], Awaitable[Result]]
# Small jobs: a worker answers supervisor pings only between jobs' native calls, so one
# Embed job must stay well under server.hang_seconds even on a busy machine.
EMBED_BATCH = 16
EMBED_ATTEMPTS = 3  # a worker replaced mid-batch (crash, hang kill) costs a retry, not the task
MAX_REQUEST_EXAMPLES = 2000
LABEL_HOLDOUT = 300  # held-out examples whose label scores tune the label-scoring weight
SHORTLIST = 5
PARAMS_VERSION = "p3"  # bump when fitting changes: cached parameters are then refitted


class FewShot:
    def __init__(
        self,
        run: Run,
        version_of: Callable[[str], str],
        cache_dir: Path,
        tasks: tuple[TaskConfig, ...],
        default_model: str,
    ) -> None:
        self._run = run
        self._version_of = version_of
        self.cache_dir = cache_dir
        self.tasks = {t.name: t for t in tasks}
        self.default_model = default_model
        self._built: OrderedDict[str, ExampleClassifier] = OrderedDict()
        self._building: dict[str, asyncio.Future[ExampleClassifier]] = {}
        self.progress: dict[str, str] = {}  # task name -> what preparing it has reached
        self._labels: dict[str, tuple[str, ...]] = {}  # task name -> its labels, once built
        self._task_keys: dict[str, tuple[tuple[str, int, int], str]] = {}  # name -> (stamp, key)

    # ------------------------------------------------------------------ public

    def label_names(self, task: str) -> list[str]:
        return list(self._labels.get(task, ()))

    async def prepare(self) -> None:
        """Build every config task's classifier (background, at start)."""
        for name, spec in self.tasks.items():
            try:
                await self._for_task(spec, wait=True)
            except SidecarError as e:
                self.progress[name] = f"failed: {e.message}"
                log.error("task %s: %s", name, e.message)

    async def classify(self, model: str, task: ClassifyTask, caller: str) -> Classification:
        started = time.perf_counter()
        if task.task:
            spec = self.tasks.get(task.task)
            if spec is None:
                known = ", ".join(sorted(self.tasks)) or "none configured"
                raise InvalidRequest(f"no task named {task.task!r} (known: {known})")
            if task.examples:
                raise InvalidRequest("give examples or a task name, not both")
            model = spec.model or model
            clf = await self._for_task(spec, wait=False)
            instruction = task.instruction or spec.instruction
            scoring, cascade = spec.label_scoring, spec.cascade
        else:
            examples = ExampleSet(
                tuple(t for t, _ in task.examples), tuple(y for _, y in task.examples)
            )
            check(examples, MAX_REQUEST_EXAMPLES)
            clf = await self._classifier(model, examples, label_scoring=False)
            instruction, scoring, cascade = task.instruction, False, True
        if task.labels:
            unknown = sorted(set(task.labels) - set(clf.names))
            if unknown:
                raise InvalidRequest(
                    f"label {unknown[0]!r} has no examples (labels with examples: "
                    f"{', '.join(clf.names[:10])}{'...' if len(clf.names) > 10 else ''})"
                )
        lex = await asyncio.to_thread(clf.lexical.similarities, task.text)
        usage = Usage(0, 0)
        probs = clf.lexical_probabilities(lex)
        # The cascade: where the words alone are as sure as the fitted gate, the model's
        # embedding would not change the answer (checked on held-out examples), so it
        # is not computed. Everything else gets the model.
        if not cascade or probs.max() < clf.params.gate:
            emb, tokens = await self._embed_one(model, task.text)
            usage = Usage(tokens, 0)  # the model's work shows in usage; 0 = answered without it
            evidence = await asyncio.to_thread(clf.evidence, emb[0], task.text, None, lex)
            probs, scored = await self._combine(
                model, task.text, clf, evidence, scoring, instruction
            )
            usage.prompt_tokens += scored
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
        result = Classification(scores[0].label, scores, usage)
        result.timings.total_ms = (time.perf_counter() - started) * 1000
        return result

    async def _combine(
        self,
        model: str,
        text: str,
        clf: ExampleClassifier,
        evidence: F64,
        scoring: bool,
        instruction: str,
    ) -> tuple[F64, int]:
        """Calibrated probabilities, and the prompt tokens label scoring cost."""
        if scoring and clf.params.shortlist:
            shortlist = clf.shortlist(evidence)
            scored = await self._score_labels(model, text, clf, shortlist, instruction)
            row = label_evidence(clf.n_labels, shortlist, _logprobs(scored, clf, shortlist))
            return clf.probabilities(np.vstack([evidence, row])), scored.usage.prompt_tokens
        return clf.probabilities(evidence), 0

    # ------------------------------------------------------------------ building

    async def _for_task(self, spec: TaskConfig, *, wait: bool) -> ExampleClassifier:
        model = spec.model or self.default_model
        version = self._version_of(model)
        # Re-reading a 10k-row CSV per request would cost more than classifying: the file
        # is read again only when it (or the model version) changes.
        try:
            st = spec.file.stat()
            stamp = (version, st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = (version, -1, -1)
        known = self._task_keys.get(spec.name)
        if known is not None and known[0] == stamp and known[1] in self._built:
            return self._built[known[1]]
        examples = await asyncio.to_thread(load_csv, spec.file, spec.text_column, spec.label_column)
        key = examples.digest(version) + ("+ls" if spec.label_scoring else "")
        self._task_keys[spec.name] = (stamp, key)
        # Known before the task is ready, so AUTO can escalate its requests meanwhile.
        self._labels[spec.name] = examples.label_names
        if key in self._built:
            return self._built[key]
        job = self._job(
            key,
            lambda: self._build(
                model, examples, key, spec.label_scoring, spec.name, spec.instruction
            ),
        )
        if not wait and not job.done():
            raise Unavailable(
                f"task {spec.name!r} is being prepared ({self.progress.get(spec.name, 'starting')}): "
                "retry shortly"
            )
        return await asyncio.shield(job)

    async def _classifier(
        self, model: str, examples: ExampleSet, *, label_scoring: bool
    ) -> ExampleClassifier:
        key = examples.digest(self._version_of(model))
        if key in self._built:
            self._built.move_to_end(key)
            return self._built[key]
        return await asyncio.shield(
            self._job(key, lambda: self._build(model, examples, key, label_scoring, "", ""))
        )

    def _job(
        self, key: str, build: Callable[[], Awaitable[ExampleClassifier]]
    ) -> asyncio.Future[ExampleClassifier]:
        """The one build of `key` in flight: concurrent requests for the same examples share
        it, and a caller that goes away does not cancel it (callers await it shielded)."""
        job = self._building.get(key)
        if job is None:
            job = self._building[key] = asyncio.ensure_future(build())
            job.add_done_callback(lambda _j: self._building.pop(key, None))
        return job

    async def _build(
        self,
        model: str,
        examples: ExampleSet,
        key: str,
        label_scoring: bool,
        task_name: str,
        instruction: str,
    ) -> ExampleClassifier:
        # Vectors depend on the examples and the model only; fitted parameters also on
        # whether label scoring takes part.
        vectors_file = self.cache_dir / f"{key.removesuffix('+ls')}.npy"
        params_file = self.cache_dir / f"{key}.{PARAMS_VERSION}.npz"
        vectors = await asyncio.to_thread(_load_vectors, vectors_file, len(examples.texts))
        if vectors is None:
            vectors = await self._embed(model, list(examples.texts), task_name)
            await asyncio.to_thread(_save_vectors, vectors_file, vectors)
        clf = await asyncio.to_thread(ExampleClassifier, examples.labels, vectors, examples.texts)
        if not await asyncio.to_thread(_load_params, params_file, clf):
            if task_name:
                self.progress[task_name] = "tuning on held-out examples"
            idx, ev = await asyncio.to_thread(fitting.fit, clf, list(examples.texts))
            if label_scoring:
                await self._fit_label_scoring(model, clf, examples, instruction, idx, ev)
            await asyncio.to_thread(_save_params, params_file, clf)
        if task_name:
            self.progress[task_name] = "ready"
        self._built[key] = clf
        while len(self._built) > 16:  # request example sets come and go: keep the recent ones
            self._built.popitem(last=False)
        return clf

    async def _embed_one(self, model: str, text: str) -> tuple[F32, int]:
        r = await self._run(model, EmbedTask((text,), normalize=True), "fewshot")
        if not isinstance(r, Embeddings):  # pragma: no cover - an engine bug
            raise FailedPrecondition("embedding returned no vectors")
        return np.asarray(r.vectors, np.float32), r.usage.prompt_tokens

    async def _embed(self, model: str, texts: list[str], task_name: str = "") -> F32:
        out: list[list[float]] = []
        # Batches go to all workers at once; each is one Embed job in the model's queue.
        batches = [texts[i : i + EMBED_BATCH] for i in range(0, len(texts), EMBED_BATCH)]
        done = 0
        sem = asyncio.Semaphore(4)  # keep every worker busy, not the whole queue

        async def one(batch: list[str]) -> list[list[float]]:
            nonlocal done
            for attempt in range(EMBED_ATTEMPTS):
                try:
                    async with sem:
                        r = await self._run(
                            model, EmbedTask(tuple(batch), normalize=True), "fewshot"
                        )
                    break
                except Unavailable:
                    if attempt == EMBED_ATTEMPTS - 1:
                        raise
                    await asyncio.sleep(0.5 * 2**attempt)
            if not isinstance(r, Embeddings):  # pragma: no cover - an engine bug
                raise FailedPrecondition("embedding returned no vectors")
            done += len(batch)
            if task_name:
                self.progress[task_name] = f"embedded {done} of {len(texts)} examples"
            return r.vectors

        for vectors in await asyncio.gather(*(one(b) for b in batches)):
            out.extend(vectors)
        return np.asarray(out, np.float32)

    async def _score_labels(
        self, model: str, text: str, clf: ExampleClassifier, shortlist: list[int], instruction: str
    ) -> Classification:
        labels = tuple(clf.names[i] for i in shortlist)
        r = await self._run(model, ClassifyTask(text, labels, instruction), "fewshot")
        if not isinstance(r, Classification):  # pragma: no cover
            raise FailedPrecondition("label scoring returned no classification")
        return r

    async def _fit_label_scoring(
        self,
        model: str,
        clf: ExampleClassifier,
        examples: ExampleSet,
        instruction: str,
        idx: npt.NDArray[np.int64],
        ev: F64,
    ) -> None:
        """The label-scoring view's weight, fitted on part of the same held-out rows."""
        clf.params = replace(clf.params, shortlist=min(SHORTLIST, clf.n_labels))
        take = np.arange(min(LABEL_HOLDOUT, len(idx)))
        sem = asyncio.Semaphore(4)  # keep every worker busy, not the whole queue

        async def row(r: int) -> F64:
            shortlist = clf.shortlist(ev[r])
            text = examples.texts[int(idx[r])]
            async with sem:
                scored = await self._score_labels(model, text, clf, shortlist, instruction)
            return label_evidence(clf.n_labels, shortlist, _logprobs(scored, clf, shortlist))

        rows = await asyncio.gather(*(row(int(r)) for r in take))
        full = np.concatenate([ev[take], np.asarray(rows)[:, None, :]], axis=1)
        clf.params = replace(clf.params, weights=fit_weights(full, clf.y[idx[take]]))


def _logprobs(scored: Classification, clf: ExampleClassifier, shortlist: list[int]) -> list[float]:
    by_label = {s.label: s.logprob for s in scored.scores}
    return [by_label[clf.names[i]] for i in shortlist]


def _load_vectors(path: Path, n: int) -> F32 | None:
    try:
        v = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if v.ndim != 2 or v.shape[0] != n:  # a damaged cache is recomputed, never trusted
        return None
    out: F32 = v.astype(np.float32)
    return out


def _save_vectors(path: Path, vectors: F32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, vectors, allow_pickle=False)
    tmp.replace(path)


def _load_params(path: Path, clf: ExampleClassifier) -> bool:
    """Restore fitted parameters and probe; False (refit) if the file is missing or damaged."""
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = json.loads(str(z["params"]))
            params = Params(**{**raw, "weights": tuple(raw["weights"])})
            probe = (z["w"].astype(np.float32), z["b"].astype(np.float32))
    except (OSError, ValueError, TypeError, KeyError, EOFError):
        return False
    if probe[0].shape != (clf.vectors.shape[1], clf.n_labels):
        return False
    clf.params, clf.probe = params, probe
    return True


def _save_params(path: Path, clf: ExampleClassifier) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, b = clf.probe if clf.probe is not None else (np.zeros((0, 0)), np.zeros(0))
    tmp = path.with_suffix(".tmp.npz")
    with tmp.open("wb") as f:
        np.savez(f, params=np.array(json.dumps(asdict(clf.params))), w=w, b=b)
    tmp.replace(path)
