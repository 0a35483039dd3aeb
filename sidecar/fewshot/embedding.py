"""Embedding for few-shot: one query text live, or a whole example set as paced background jobs.

An example set's Embed jobs wait in the pool's background lane (they run only when no
live request waits) and each is sized to take about half a second on a worker (see
`pacing`: a worker that is embedding misses pings). A full lane or a restarted worker
costs a retry, not the build. What a cancelled build already embedded is kept for a
while, so a caller that retries after a deadline resumes instead of starting over; and
every `CHECKPOINT_S` the build hands what it has to `checkpoint` (the disk cache), so a
daemon that stops or dies mid-build resumes too.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from sidecar.domain.errors import FailedPrecondition, Overloaded, Unavailable
from sidecar.domain.seam import Engine
from sidecar.domain.types import Embeddings, EmbedTask, Result
from sidecar.fewshot.classifier import F32
from sidecar.fewshot.pacing import Pacer, size, take

EMBED_CONCURRENCY = 4  # jobs of one build in the queue at once: every worker busy, no more
EMBED_ATTEMPTS = 3  # a worker restarted or a full lane costs a retry, not the build
PARTIAL_KEEP = 4  # abandoned builds whose embedded batches are kept for a retry
CHECKPOINT_S = 5.0  # how often a build saves what it has embedded (a 10k set: ~23 MB)

T = TypeVar("T")


class Embedder:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._partial: OrderedDict[str, Partial] = OrderedDict()  # abandoned builds' work
        self._pacers: dict[str, Pacer] = {}  # model -> how fast its workers embed

    async def one(
        self, model: str, text: str, caller: str, background: bool = False
    ) -> tuple[F32, Embeddings]:
        """A query's vector, as a live request (or a low-priority one's, `background`); the
        reply says who embedded it and when."""
        r = await self._engine.run(
            model, EmbedTask((text,), normalize=True), caller, background=background
        )
        if not isinstance(r, Embeddings):  # pragma: no cover - an engine bug
            raise FailedPrecondition("embedding returned no vectors")
        return np.asarray(r.vectors, np.float32), r

    async def all(
        self,
        model: str,
        texts: list[str],
        caller: str,
        key: str,
        progress: Callable[[int], None] = lambda _n: None,
        resume: Partial | None = None,
        checkpoint: Callable[[Partial], Awaitable[None]] | None = None,
    ) -> F32:
        """Every text's vector, in order; `progress` hears how many are embedded so far.

        `resume`: what an earlier build of the same set made (from the disk), used when
        this process kept nothing in memory; `checkpoint` is handed the work so far every
        CHECKPOINT_S (one at a time).
        """
        done = self._partial.pop(key, None) or resume or Partial(len(texts))
        self._partial[key] = done
        while len(self._partial) > PARTIAL_KEEP:
            self._partial.popitem(last=False)
        # Shortest first: a job then holds texts of similar lengths, and the worker pads the
        # texts of a decode to one token length (see sidecar/worker/embed.py).
        pending = deque(
            sorted((i for i in range(len(texts)) if not done.have[i]), key=lambda i: size(texts[i]))
        )
        pacer = self._pacers.setdefault(model, Pacer())
        last_save = time.monotonic()
        saving = False

        async def save() -> None:
            nonlocal last_save, saving
            if checkpoint is None or saving or time.monotonic() - last_save < CHECKPOINT_S:
                return
            saving = True
            try:
                await checkpoint(done.copy())
            finally:
                last_save, saving = time.monotonic(), False

        async def worker() -> None:  # EMBED_CONCURRENCY of these pull jobs until none is left
            while pending:
                chunk = take(pending, texts, pacer.budget())
                batch = tuple(texts[i] for i in chunk)
                r = await self._job(model, batch, caller)
                pacer.record(sum(size(t) for t in batch), _worker_seconds(r))
                done.put(chunk, np.asarray(r.vectors, np.float32))
                progress(int(done.have.sum()))
                await save()

        await all_or_cancel(worker() for _ in range(EMBED_CONCURRENCY))
        self._partial.pop(key, None)
        assert done.vectors is not None  # an ExampleSet is never empty
        return done.vectors

    async def _job(self, model: str, batch: tuple[str, ...], caller: str) -> Embeddings:
        for attempt in range(EMBED_ATTEMPTS):
            try:
                r = await self._engine.run(
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


@dataclass
class Partial:
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

    def copy(self) -> Partial:
        """A snapshot to write out while the build goes on."""
        out = Partial(self.n)
        out.vectors = None if self.vectors is None else self.vectors.copy()
        out.have = self.have.copy()
        return out

    @classmethod
    def of(cls, vectors: F32, have: npt.NDArray[np.bool_]) -> Partial:
        out = cls(len(have))
        out.vectors, out.have = vectors, have
        return out


def _worker_seconds(r: Result) -> float:
    """Time the job took on its worker: total minus the wait in the queue."""
    return max(r.timings.total_ms - r.timings.queue_ms, 0.0) / 1000


async def all_or_cancel(work: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
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
