"""FakeSlot: a slot with no llama.cpp behind it, for fast tests of everything around the model.

Deterministic and cheap: generation echoes the prompt's words one "token" at a time
(optionally slowly, to test queues, cancellation and deadlines), classification picks
the label sharing most characters with the text, embeddings are hashes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from typing import Any

from sidecar.domain.errors import Cancelled
from sidecar.domain.specs import ModelFacts, RunnerSpec
from sidecar.domain.status import SlotInfo
from sidecar.domain.types import (
    ChatTask,
    Classification,
    ClassifyTask,
    Embeddings,
    EmbedTask,
    Extraction,
    ExtractTask,
    GenerateTask,
    Generation,
    LabelScore,
    Result,
    Task,
    TokenConfidence,
    TokenEvent,
    Usage,
)
from sidecar.engine.slots import Events, Unsupervised
from sidecar.worker import label_scope
from sidecar.worker.labels import normalise

FAKE_FACTS = ModelFacts(n_ctx=2048, n_vocab=256, n_embd=8, chat_template=False)


class FakeSlot(Unsupervised):
    token_delay_s = 0.0  # tests raise it to make work observable
    capacity = 1  # jobs at once; tests raise it to play a batching worker

    def __init__(self, spec: RunnerSpec, events: Events) -> None:
        self.spec = spec
        self.events = events
        self.info = SlotInfo(None, "starting", 0)
        self.facts: ModelFacts | None = None
        self.job_ids: set[int] = set()
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self.tokens_made = 0

    async def start(self) -> ModelFacts:
        self.facts = FAKE_FACTS
        self.info.state = "idle"
        return FAKE_FACTS

    def submit(self, job_id: int, task: Task, stream: bool) -> None:
        self.job_ids.add(job_id)
        self.info.state = "busy"
        self.info.requests += 1
        self._tasks[job_id] = asyncio.get_running_loop().create_task(
            self._run(job_id, task, stream)
        )

    async def _run(self, job_id: int, task: Task, stream: bool) -> None:
        try:
            result = await self._answer(job_id, task, stream)
        except asyncio.CancelledError:
            self._settle(job_id)
            self.events.failed(self, job_id, Cancelled("cancelled by the caller"))
            return
        self._settle(job_id)
        self.events.done(self, job_id, result)

    def _settle(self, job_id: int) -> None:
        self.job_ids.discard(job_id)
        self._tasks.pop(job_id, None)
        if not self.job_ids:
            self.info.state = "idle"

    async def _answer(self, job_id: int, task: Task, stream: bool) -> Result:
        if isinstance(task, GenerateTask | ChatTask):
            source = task.prompt if isinstance(task, GenerateTask) else task.messages[-1].content
            words = source.split() or ["…"]
            limit = task.max_tokens or self.spec.default_max_tokens
            out = [words[i % len(words)] for i in range(limit)]
            started = time.perf_counter()
            first_ms = 0.0
            for w in out:
                await asyncio.sleep(self.token_delay_s)
                first_ms = first_ms or max((time.perf_counter() - started) * 1000, 1e-3)
                self.tokens_made += 1
                if stream:
                    self.events.token(self, job_id, TokenEvent(w + " "))
            gen = Generation(
                text=" ".join(out) + " ",
                finish_reason="length",
                usage=Usage(len(words), len(out)),
                confidence=TokenConfidence(-0.5, -1.0),
            )
            gen.timings.first_token_ms = first_ms
            return gen
        await asyncio.sleep(self.token_delay_s)
        if isinstance(task, ClassifyTask):
            overlap = [float(len(set(label) & set(task.text))) for label in task.labels]
            probs = normalise(overlap)
            scores = sorted(
                (
                    LabelScore(lb, p, o)
                    for lb, p, o in zip(task.labels, probs, overlap, strict=True)
                ),
                key=lambda s: -s.probability,
            )
            # A made-up novelty in [0, 0.5] (the spread of the made-up scores), so that tests
            # can put a cut on either side of it.
            spread = label_scope.features([math.log(max(p, 1e-300)) for p in probs]).entropy
            novelty = 0.5 * spread
            return Classification(
                scores[0].label,
                tuple(scores),
                Usage(len(task.text), len(task.labels)),
                novelty=novelty,
            )
        if isinstance(task, ExtractTask):
            return Extraction(
                json.dumps(_example(json.loads(task.schema))),
                Usage(1, 1),
                TokenConfidence(-0.1, -0.2),
            )
        if isinstance(task, EmbedTask):
            vectors = [
                [b / 255 for b in hashlib.sha256(t.encode()).digest()[:8]] for t in task.texts
            ]
            return Embeddings(vectors, Usage(len(task.texts), 0))
        raise AssertionError(task)  # pragma: no cover

    def cancel(self, job_id: int) -> None:
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self.info.state = "stopped"


def _example(schema: dict[str, Any]) -> Any:
    """A small instance of simple schemas (object/string/number/integer/boolean/enum)."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "object")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: _example(v) for k, v in props.items()}
    return {
        "string": "x",
        "number": 1.5,
        "integer": 1,
        "boolean": True,
        "array": [],
        "null": None,
    }.get(kind)
