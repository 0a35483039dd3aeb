"""Example-based Classify inside the daemon: embed once, cache on disk, answer in milliseconds.

A request's examples (or a config task's CSV) are embedded by the model's own workers
once; the vectors are cached under the store by the content hash of the examples and
the model version (a hot swap changes the version, so the new model re-embeds). The
classifier is tuned on its examples (see `fit`) when it is built, and its tuned
parameters are cached beside the vectors.

Config tasks are prepared in the background at start; a request that arrives before
its task is ready gets UNAVAILABLE saying how far preparation has got (in AUTO that is a
local failure, so the cloud answers it).

Building is background work and must never crowd out live requests: its Embed jobs
wait in the pool's background lane (they run only when no live request waits), each
job is sized to take about half a second on a worker (see `pacing`: a worker that is
embedding misses pings), a caller may have `MAX_BUILDS_PER_CALLER` request builds in
flight and everyone together `MAX_BUILDS`, and a request build nobody waits for any
more is cancelled (what it embedded so far is kept in memory for a retry). The vector
cache on disk is capped at `cache_max_bytes`, least recently used files going first;
the files of config tasks are never evicted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from sidecar.config import TaskConfig
from sidecar.domain.errors import (
    FailedPrecondition,
    InvalidRequest,
    Overloaded,
    SidecarError,
    Unavailable,
)
from sidecar.domain.types import (
    Classification,
    ClassifyTask,
    Embeddings,
    EmbedTask,
    LabelScore,
    Result,
    Task,
    Usage,
)
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
from sidecar.fewshot.pacing import Pacer, size, take

log = logging.getLogger("sidecar.fewshot")


class Run(Protocol):
    def __call__(
        self, model: str, task: Task, caller: str, *, background: bool = False
    ) -> Awaitable[Result]: ...


# Jobs are sized to the measured speed (see `pacing`): a worker answers no ping while
# it embeds.
EMBED_CONCURRENCY = 4  # jobs of one build in the queue at once: every worker busy, no more
EMBED_ATTEMPTS = 3  # a worker restarted or a full lane costs a retry, not the build
MAX_BUILDS_PER_CALLER = 2  # request builds (not config tasks) in flight per caller
MAX_BUILDS = 4  # ... and for all callers together
PARTIAL_KEEP = 4  # abandoned builds whose embedded batches are kept for a retry
CACHE_MAX_BYTES = 256 * 1024 * 1024  # vector + parameter files on disk
TASK_CALLER = "sidecar:task"  # the queue key config task builds run under
MAX_REQUEST_EXAMPLES = 2000
LABEL_HOLDOUT = 300  # held-out examples whose label scores tune the label-scoring weight
SHORTLIST = 5
PARAMS_VERSION = "p3"  # bump when fitting changes: cached parameters are then refitted

T = TypeVar("T")


@dataclass
class _Build:
    """One classifier being built; request builds end when their last waiter leaves."""

    key: str
    future: asyncio.Future[ExampleClassifier]
    owner: str  # the caller that started it; "" for a config task (never cancelled)
    waiters: int = 0


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
        self.cache_max_bytes = CACHE_MAX_BYTES
        self._built: OrderedDict[str, ExampleClassifier] = OrderedDict()
        self._building: dict[str, _Build] = {}
        self._partial: OrderedDict[str, _Partial] = OrderedDict()  # abandoned builds' work
        self._pacers: dict[str, Pacer] = {}  # model -> how fast its workers embed
        self._keep: set[str] = set()  # cache keys of config tasks: never evicted
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
            clf = await self._classifier(model, examples, caller)
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
            emb, tokens = await self._embed_one(model, task.text, caller)
            usage = Usage(tokens, 0)  # the model's work shows in usage; 0 = answered without it
            evidence = await asyncio.to_thread(clf.evidence, emb[0], task.text, None, lex)
            probs, scored = await self._combine(
                model, task.text, clf, evidence, scoring, instruction, caller
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
        caller: str,
    ) -> tuple[F64, int]:
        """Calibrated probabilities, and the prompt tokens label scoring cost."""
        if scoring and clf.params.shortlist:
            shortlist = clf.shortlist(evidence)
            scored = await self._score_labels(model, text, clf, shortlist, instruction, caller)
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
        self._keep.add(key)
        # Known before the task is ready, so AUTO can escalate its requests meanwhile.
        self._labels[spec.name] = examples.label_names
        if key in self._built:
            return self._built[key]
        job = self._building.get(key)
        if job is None:
            job = self._start(
                key,
                "",
                self._build(
                    model,
                    examples,
                    key,
                    spec.label_scoring,
                    spec.name,
                    spec.instruction,
                    TASK_CALLER,
                ),
            )
        if not wait and not job.future.done():
            raise Unavailable(
                f"task {spec.name!r} is being prepared ({self.progress.get(spec.name, 'starting')}): "
                "retry shortly"
            )
        return await self._wait(job)

    async def _classifier(self, model: str, examples: ExampleSet, caller: str) -> ExampleClassifier:
        key = examples.digest(self._version_of(model))
        if key in self._built:
            self._built.move_to_end(key)
            return self._built[key]
        job = self._building.get(key)
        if job is None:  # concurrent requests for the same examples share one build
            self._admit(caller)
            job = self._start(key, caller, self._build(model, examples, key, False, "", "", caller))
        return await self._wait(job)

    def _admit(self, caller: str) -> None:
        """Bound request builds per caller and in total; a refusal says how to get through."""
        owners = [b.owner for b in self._building.values() if b.owner]
        mine = owners.count(caller)
        if mine >= MAX_BUILDS_PER_CALLER:
            raise Overloaded(
                f"{mine} example sets of this caller are being embedded already (at most "
                f"{MAX_BUILDS_PER_CALLER} at once): wait for them, or define a task in the "
                "config for examples you reuse"
            )
        if len(owners) >= MAX_BUILDS:
            raise Overloaded(
                f"{len(owners)} example sets are being embedded (at most {MAX_BUILDS} at "
                "once): retry after a short backoff"
            )

    def _start(self, key: str, owner: str, build: Coroutine[Any, Any, ExampleClassifier]) -> _Build:
        job = self._building[key] = _Build(key, asyncio.ensure_future(build), owner)
        job.future.add_done_callback(lambda _f: self._finished(job))
        return job

    def _finished(self, job: _Build) -> None:
        self._forget(job)
        f = job.future
        if not f.cancelled() and f.exception() is not None and not job.waiters:
            # A build nobody waits for any more (a config task at shutdown, say): its
            # failure is logged here, or asyncio would complain it was never retrieved.
            log.info("building a classifier failed with nobody waiting: %s", f.exception())

    def _forget(self, job: _Build) -> None:
        if self._building.get(job.key) is job:
            del self._building[job.key]

    async def _wait(self, job: _Build) -> ExampleClassifier:
        """Await a build shielded from this caller going away; the last waiter of a request
        build to leave cancels it, so abandoned builds stop taking the workers' time."""
        job.waiters += 1
        try:
            return await asyncio.shield(job.future)
        finally:
            job.waiters -= 1
            if job.waiters == 0 and job.owner and not job.future.done():
                job.future.cancel()
                self._forget(job)  # now: a request arriving meanwhile starts afresh

    async def _build(
        self,
        model: str,
        examples: ExampleSet,
        key: str,
        label_scoring: bool,
        task_name: str,
        instruction: str,
        caller: str,
    ) -> ExampleClassifier:
        # Vectors depend on the examples and the model only; fitted parameters also on
        # whether label scoring takes part.
        vectors_file = self.cache_dir / f"{key.removesuffix('+ls')}.npy"
        params_file = self.cache_dir / f"{key}.{PARAMS_VERSION}.npz"
        vectors = await asyncio.to_thread(_load_vectors, vectors_file, len(examples.texts))
        if vectors is None:
            vectors = await self._embed(model, list(examples.texts), caller, key, task_name)
            await asyncio.to_thread(_save_vectors, vectors_file, vectors)
            await asyncio.to_thread(
                _prune, self.cache_dir, self.cache_max_bytes, self._kept_files(vectors_file)
            )
        clf = await asyncio.to_thread(ExampleClassifier, examples.labels, vectors, examples.texts)
        if not await asyncio.to_thread(_load_params, params_file, clf):
            if task_name:
                self.progress[task_name] = "tuning on held-out examples"
            idx, ev = await asyncio.to_thread(fitting.fit, clf, list(examples.texts))
            if label_scoring:
                await self._fit_label_scoring(model, clf, examples, instruction, idx, ev, caller)
            await asyncio.to_thread(_save_params, params_file, clf)
            await asyncio.to_thread(
                _prune, self.cache_dir, self.cache_max_bytes, self._kept_files(params_file)
            )
        if task_name:
            self.progress[task_name] = "ready"
        self._built[key] = clf
        while len(self._built) > 16:  # request example sets come and go: keep the recent ones
            self._built.popitem(last=False)
        return clf

    def _kept_files(self, just_written: Path) -> set[str]:
        names = {just_written.name}
        for key in self._keep:
            names |= {f"{key.removesuffix('+ls')}.npy", f"{key}.{PARAMS_VERSION}.npz"}
        return names

    async def _embed_one(self, model: str, text: str, caller: str) -> tuple[F32, int]:
        r = await self._run(model, EmbedTask((text,), normalize=True), caller)
        if not isinstance(r, Embeddings):  # pragma: no cover - an engine bug
            raise FailedPrecondition("embedding returned no vectors")
        return np.asarray(r.vectors, np.float32), r.usage.prompt_tokens

    async def _embed(
        self, model: str, texts: list[str], caller: str, key: str, task_name: str
    ) -> F32:
        # What a cancelled build already embedded is kept, so a caller that retries
        # after a deadline resumes instead of starting over.
        done = self._partial.pop(key, None) or _Partial(len(texts))
        self._partial[key] = done
        while len(self._partial) > PARTIAL_KEEP:
            self._partial.popitem(last=False)
        pending = deque(i for i in range(len(texts)) if not done.have[i])
        pacer = self._pacers.setdefault(model, Pacer())

        async def worker() -> None:  # EMBED_CONCURRENCY of these pull jobs until none is left
            while pending:
                chunk = take(pending, texts, pacer.budget())
                batch = tuple(texts[i] for i in chunk)
                r = await self._embed_job(model, batch, caller)
                pacer.record(sum(size(t) for t in batch), _worker_seconds(r))
                done.put(chunk, np.asarray(r.vectors, np.float32))
                if task_name:
                    n = int(done.have.sum())
                    self.progress[task_name] = f"embedded {n} of {len(texts)} examples"

        await _all(worker() for _ in range(EMBED_CONCURRENCY))
        self._partial.pop(key, None)
        assert done.vectors is not None  # an ExampleSet is never empty
        return done.vectors

    async def _embed_job(self, model: str, batch: tuple[str, ...], caller: str) -> Embeddings:
        for attempt in range(EMBED_ATTEMPTS):
            try:
                r = await self._run(
                    model, EmbedTask(batch, normalize=True), caller, background=True
                )
                break
            except (Unavailable, Overloaded):  # never KilledWorker: that one is not retried
                if attempt == EMBED_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.5 * 2**attempt)
        if not isinstance(r, Embeddings):  # pragma: no cover - an engine bug
            raise FailedPrecondition("embedding returned no vectors")
        return r

    async def _score_labels(
        self,
        model: str,
        text: str,
        clf: ExampleClassifier,
        shortlist: list[int],
        instruction: str,
        caller: str,
        *,
        background: bool = False,
    ) -> Classification:
        labels = tuple(clf.names[i] for i in shortlist)
        r = await self._run(
            model, ClassifyTask(text, labels, instruction), caller, background=background
        )
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
        caller: str,
    ) -> None:
        """The label-scoring view's weight, fitted on part of the same held-out rows."""
        clf.params = replace(clf.params, shortlist=min(SHORTLIST, clf.n_labels))
        held = np.arange(min(LABEL_HOLDOUT, len(idx)))
        sem = asyncio.Semaphore(EMBED_CONCURRENCY)

        async def row(r: int) -> F64:
            shortlist = clf.shortlist(ev[r])
            text = examples.texts[int(idx[r])]
            async with sem:
                scored = await self._score_labels(
                    model, text, clf, shortlist, instruction, caller, background=True
                )
            return label_evidence(clf.n_labels, shortlist, _logprobs(scored, clf, shortlist))

        rows = await _all(row(int(r)) for r in held)
        full = np.concatenate([ev[held], np.asarray(rows)[:, None, :]], axis=1)
        clf.params = replace(clf.params, weights=fit_weights(full, clf.y[idx[held]]))


@dataclass
class _Partial:
    """The vectors of a build so far, row by row."""

    n: int
    vectors: F32 | None = None
    have: npt.NDArray[np.bool_] = field(init=False)

    def __post_init__(self) -> None:
        self.have = np.zeros(self.n, bool)

    def put(self, rows: list[int], vectors: F32) -> None:
        if self.vectors is None:
            self.vectors = np.zeros((self.n, vectors.shape[1]), np.float32)
        self.vectors[rows] = vectors
        self.have[rows] = True


def _worker_seconds(r: Result) -> float:
    """Time the job took on its worker: total minus the wait in the queue."""
    return max(r.timings.total_ms - r.timings.queue_ms, 0.0) / 1000


async def _all(work: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """gather, but the first failure (or our own cancellation) cancels the rest."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
            # A second failure (or a job that ends in Cancelled once cancelled) is nobody's
            # result: read it, or asyncio logs "Task exception was never retrieved".
            t.add_done_callback(_consume)


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _logprobs(scored: Classification, clf: ExampleClassifier, shortlist: list[int]) -> list[float]:
    by_label = {s.label: s.logprob for s in scored.scores}
    return [by_label[clf.names[i]] for i in shortlist]


def _load_vectors(path: Path, n: int) -> F32 | None:
    try:
        v = np.load(path, allow_pickle=False)
        os.utime(path)  # recently used: the last the cache cap evicts
    except (OSError, ValueError):
        return None
    if v.ndim != 2 or v.shape[0] != n:  # a damaged cache is recomputed, never trusted
        return None
    out: F32 = v.astype(np.float32)
    return out


def _prune(folder: Path, max_bytes: int, keep: set[str]) -> None:
    """Remove the least recently used cache files until the folder fits in max_bytes."""
    entries = []
    for p in folder.iterdir():
        try:
            st = p.stat()
        except OSError:
            continue  # removed meanwhile
        entries.append((st.st_mtime_ns, st.st_size, p))
    total = sum(nbytes for _, nbytes, _ in entries)
    for _, nbytes, p in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if p.name in keep:
            continue
        try:
            p.unlink()
        except OSError:
            continue
        total -= nbytes
        log.info("vector cache over %d MiB: removed %s", max_bytes // (1024 * 1024), p.name)


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
    with contextlib.suppress(OSError):
        os.utime(path)
    return True


def _save_params(path: Path, clf: ExampleClassifier) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, b = clf.probe if clf.probe is not None else (np.zeros((0, 0)), np.zeros(0))
    tmp = path.with_suffix(".tmp.npz")
    with tmp.open("wb") as f:
        np.savez(f, params=np.array(json.dumps(asdict(clf.params))), w=w, b=b)
    tmp.replace(path)
