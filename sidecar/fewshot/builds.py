"""Building few-shot classifiers: one build per example set, shared, bounded, cancellable.

A classifier is keyed by the content hash of its examples and the version of the model
that embeds them (a hot swap changes the version, so the new model re-embeds). Its
vectors and tuned parameters come from the disk cache (`vectors`) when they can,
otherwise from paced background Embed jobs (`embedding`, resuming what a stopped build
had saved and reusing the vectors of texts other cached sets hold) and a fit on held-out
examples (`fit`, `scoring`, and the out-of-scope calibration, `novelty`). A task's
out-of-scope examples are embedded with its set and kept apart from the labels.

Building is background work and must never crowd out live requests: a caller may have
`MAX_BUILDS_PER_CALLER` request builds in flight and everyone together `MAX_BUILDS`;
concurrent requests for the same examples share one build; a request build nobody
waits for any more is cancelled (what it embedded so far is kept for a retry). Config
tasks are built once at start and whenever their CSV file or the model version changes;
a request that arrives while its task is being prepared gets UNAVAILABLE saying how far
preparation has got (in AUTO that is a local failure, so the cloud answers it).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sidecar.config import TaskConfig
from sidecar.domain.errors import Overloaded, Unavailable
from sidecar.domain.lanes import LOW_PRIORITY
from sidecar.domain.seam import Engine
from sidecar.domain.types import ModelRef
from sidecar.fewshot import fit as fitting
from sidecar.fewshot.classifier import ExampleClassifier
from sidecar.fewshot.embedding import Embedder, Partial
from sidecar.fewshot.examples import NONE, ExampleSet, load_task
from sidecar.fewshot.scoring import fit_label_scoring
from sidecar.fewshot.vectors import LABEL_SCORING, VectorCache

log = logging.getLogger("sidecar.fewshot")

MAX_BUILDS_PER_CALLER = 2  # request builds (not config tasks) in flight per caller
MAX_BUILDS = 4  # ... and for all callers together
BUILT_KEEP = 16  # request example sets come and go: keep the recent ones in memory
TASK_CALLER = "sidecar:task"  # the queue key config task builds run under


@dataclass(frozen=True)
class Built:
    clf: ExampleClassifier
    ref: ModelRef  # the model (and version) whose vectors it holds


@dataclass
class _Build:
    """One classifier being built; request builds end when their last waiter leaves."""

    key: str
    future: asyncio.Future[Built]
    owner: str  # the caller that started it; "" for a config task (never cancelled)
    waiters: int = 0


class Builds:
    def __init__(self, engine: Engine, embedder: Embedder, cache: VectorCache) -> None:
        self._engine = engine
        self._embedder = embedder
        self.cache = cache
        self._built: OrderedDict[str, Built] = OrderedDict()
        self._building: dict[str, _Build] = {}
        self.progress: dict[str, str] = {}  # task name -> what preparing it has reached
        self._labels: dict[str, tuple[str, ...]] = {}  # task name -> its labels, once read
        self._task_keys: dict[str, tuple[tuple[str | int, ...], str]] = {}  # name -> (stamp, key)

    @property
    def in_flight(self) -> int:
        """Builds running now (request builds and config tasks)."""
        return len(self._building)

    def labels(self, task: str) -> tuple[str, ...]:
        return self._labels.get(task, ())

    async def for_task(self, spec: TaskConfig, *, wait: bool) -> Built:
        """A config task's classifier; `wait=False` refuses while it is being prepared."""
        model = spec.model or self._engine.default_model
        ref = self._engine.ref(model)
        # Re-reading a 10k-row CSV per request would cost more than classifying: the file
        # is read again only when it (or the model version) changes.
        # Label scores with an adapter are another model's: a new version of the adapter
        # is refitted like a new version of the model.
        lora = ""
        if spec.adapter and spec.label_scoring:
            lora = f"+{spec.adapter}@{self._engine.adapter_ref(model, spec.adapter).version}"
        stamp = (ref.version + lora, *_file_stamp(spec.file), *_file_stamp(spec.none_file))
        known = self._task_keys.get(spec.name)
        if known is not None and known[0] == stamp and known[1] in self._built:
            return self._built[known[1]]
        examples = await asyncio.to_thread(
            load_task,
            spec.file,
            spec.text_column,
            spec.label_column,
            spec.none_label,
            spec.none_file,
        )
        key = examples.digest(ref.version + lora) + (LABEL_SCORING if spec.label_scoring else "")
        self._task_keys[spec.name] = (stamp, key)
        self.cache.keep(key)
        # Known before the task is ready, so AUTO can escalate its requests meanwhile.
        self._labels[spec.name] = examples.label_names
        if key in self._built:
            return self._built[key]
        job = self._building.get(key)
        if job is None:
            build = self._build(model, ref, examples, key, spec, TASK_CALLER)
            job = self._start(key, "", build)
        if not wait and not job.future.done():
            raise Unavailable(
                f"task {spec.name!r} is being prepared ({self.progress.get(spec.name, 'starting')}): "
                "retry shortly"
            )
        return await self._wait(job)

    async def for_examples(self, model: str, examples: ExampleSet, caller: str) -> Built:
        """The classifier of a request's examples, built (and cached) on first use."""
        ref = self._engine.ref(model)
        key = examples.digest(ref.version)
        if key in self._built:
            self._built.move_to_end(key)
            return self._built[key]
        job = self._building.get(key)
        if job is None:  # concurrent requests for the same examples share one build
            self._admit(caller)
            job = self._start(key, caller, self._build(model, ref, examples, key, None, caller))
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

    def _start(self, key: str, owner: str, build: Coroutine[Any, Any, Built]) -> _Build:
        job = self._building[key] = _Build(key, asyncio.ensure_future(_unmarked(build)), owner)
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

    async def _wait(self, job: _Build) -> Built:
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
        ref: ModelRef,
        examples: ExampleSet,
        key: str,
        task: TaskConfig | None,
        caller: str,
    ) -> Built:
        name = task.name if task is not None else ""
        cache = self.cache
        vectors = await asyncio.to_thread(cache.load_vectors, key, len(examples.texts))
        if vectors is not None:  # cached before sets recorded their texts: record them now
            await asyncio.to_thread(
                cache.save_texts, key, ref.version, examples.texts, if_missing=True
            )
        else:
            total = len(examples.texts)

            def progress(n: int) -> None:
                if name:
                    self.progress[name] = f"embedded {n} of {total} examples"

            stored = await asyncio.to_thread(cache.load_partial, key, total)
            if stored is None:  # texts other sets of this model version hold: not again
                stored = await asyncio.to_thread(cache.seed, key, ref.version, examples.texts)
            resume = Partial.of(*stored) if stored is not None else None

            async def checkpoint(done: Partial) -> None:
                if done.vectors is not None:
                    await asyncio.to_thread(cache.save_partial, key, done.vectors, done.have)

            vectors = await self._embedder.all(
                model, list(examples.texts), caller, key, progress, resume, checkpoint
            )
            await asyncio.to_thread(cache.save_vectors, key, vectors)
            await asyncio.to_thread(cache.save_texts, key, ref.version, examples.texts)
            await asyncio.to_thread(cache.drop_partial, key)
        labelled = examples.in_scope()
        scoped = np.array([y != NONE for y in examples.labels])
        none = vectors[~scoped] if not scoped.all() else None
        clf = await asyncio.to_thread(
            ExampleClassifier,
            labelled.labels,
            vectors[scoped],
            labelled.texts,
            none,
            examples.none_texts,
        )
        if not await asyncio.to_thread(cache.load_params, key, clf):
            if name:
                self.progress[name] = "tuning on held-out examples"
            idx, ev = await asyncio.to_thread(fitting.fit, clf, list(labelled.texts))
            if task is not None and task.label_scoring:
                await fit_label_scoring(
                    self._engine,
                    model,
                    clf,
                    labelled,
                    task.instruction,
                    idx,
                    ev,
                    caller,
                    task.adapter,
                )
            await asyncio.to_thread(cache.save_params, key, clf)
        if name:
            self.progress[name] = "ready"
        built = self._built[key] = Built(clf, ref)
        while len(self._built) > BUILT_KEEP:
            self._built.popitem(last=False)
        return built


def _file_stamp(path: Path | None) -> tuple[int, int]:
    """(mtime, size) of a task's file: re-read only when it changes; (-1, -1) unreadable."""
    if not path:  # None, or "" in a TaskConfig built directly
        return (0, 0)
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_mtime_ns, st.st_size)


async def _unmarked(build: Coroutine[Any, Any, Built]) -> Built:
    """A build a low-priority request started is not that request: its jobs are build work
    (the backstop bounds them), and its first dispatch must not start the request's clock.
    The task runs in its own copy of the context, so this clears the mark for it alone."""
    LOW_PRIORITY.set(None)
    return await build
