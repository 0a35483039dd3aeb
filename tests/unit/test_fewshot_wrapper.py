"""FewShotEngine is an engine wrapper: it answers Classify by examples or by task itself
(building with background jobs on the inner engine, stamping who answered and when),
passes everything else through untouched, and keeps config task thresholds live."""

from __future__ import annotations

import csv
import hashlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sidecar.config import TaskConfig
from sidecar.domain.errors import InvalidRequest, Unavailable
from sidecar.domain.seam import DEFAULT_ROUTE
from sidecar.domain.status import PoolStatus
from sidecar.domain.types import (
    Classification,
    ClassifyTask,
    Embeddings,
    EmbedTask,
    GenerateTask,
    Generation,
    ModelRef,
    Result,
    RouteRequest,
    Timings,
    TokenConfidence,
    TokenEvent,
    Usage,
)
from sidecar.fewshot.wrapper import FewShotEngine

ROWS = [
    ("where is my new card", "card_arrival"),
    ("my card has not arrived yet", "card_arrival"),
    ("card still not delivered", "card_arrival"),
    ("when will my card arrive", "card_arrival"),
    ("what is the exchange rate for euros", "exchange_rate"),
    ("how much is the dollar exchange rate", "exchange_rate"),
    ("rate to exchange pounds", "exchange_rate"),
    ("exchange rate today", "exchange_rate"),
    ("I forgot my pin", "pin"),
    ("my pin is blocked", "pin"),
    ("reset my pin number", "pin"),
    ("how do I change my pin", "pin"),
]
REF = ModelRef("m", "v1")
QUEUE_MS = 7.0


def vector(text: str) -> list[float]:
    """Bag of hashed words: similar texts get similar vectors, deterministically."""
    v = np.zeros(32)
    for word in text.lower().split():
        v[hashlib.sha256(word.encode()).digest()[0] % 32] += 1.0
    return list(v / max(float(np.linalg.norm(v)), 1e-9))


@dataclass
class Inner:
    """An Engine that records what reached it."""

    default_model: str = "m"
    ready: bool = True
    runs: list[tuple[str, Any, str, RouteRequest, bool]] = field(default_factory=list)
    checked: list[Any] = field(default_factory=list)
    started: bool = False
    closed: bool = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    def ref(self, model: str) -> ModelRef:
        return REF

    def check(self, model: str, task: Any) -> None:
        self.checked.append(task)

    async def run(
        self,
        model: str,
        task: Any,
        caller: str,
        *,
        route: RouteRequest = DEFAULT_ROUTE,
        background: bool = False,
    ) -> Result:
        self.runs.append((model, task, caller, route, background))
        if isinstance(task, EmbedTask):
            return Embeddings(
                [vector(t) for t in task.texts],
                Usage(len(task.texts), 0),
                REF,
                Timings(queue_ms=QUEUE_MS, total_ms=QUEUE_MS + 1),
            )
        return Generation("inner", "stop", Usage(1, 1), TokenConfidence(0.0, 0.0), REF)

    async def stream(
        self, model: str, task: Any, caller: str, *, route: RouteRequest = DEFAULT_ROUTE
    ) -> AsyncIterator[TokenEvent | Generation]:
        self.runs.append((model, task, caller, route, False))
        yield TokenEvent("in")
        yield Generation("inner", "stop", Usage(1, 1), TokenConfidence(0.0, 0.0), REF)

    def status(self) -> list[tuple[PoolStatus, bool]]:
        return []


def task_config(folder: Path, **kw: Any) -> TaskConfig:
    path = folder / "intents.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "intent"])
        w.writerows(ROWS)
    base: dict[str, Any] = dict(
        name="intents", file=path, text_column="text", label_column="intent", model="",
        instruction="", threshold=-1.0, label_scoring=False, cascade=False,
    )  # fmt: skip
    return TaskConfig(**(base | kw))


async def test_other_requests_pass_through_untouched(tmp_path: Path) -> None:
    inner = Inner()
    fs = FewShotEngine(inner, tmp_path, ())
    route = RouteRequest("LOCAL_ONLY", sensitive=True)
    task = GenerateTask("hi", 3)
    r = await fs.run("m", task, "alice", route=route, background=True)
    assert isinstance(r, Generation) and r.text == "inner"
    plain = ClassifyTask("text", ("a", "b"))
    await fs.run("", plain, "bob")
    assert inner.runs == [
        ("m", task, "alice", route, True),
        ("", plain, "bob", RouteRequest(), False),
    ]
    events = [e async for e in fs.stream("m", task, "carol", route=route)]
    assert isinstance(events[-1], Generation) and inner.runs[-1][3] == route
    fs.check("m", task)
    assert inner.checked == [task]
    assert (fs.default_model, fs.ready, fs.ref("x"), fs.status()) == ("m", True, REF, [])
    await fs.start()
    await fs.close()
    assert inner.started and inner.closed


async def test_request_examples_are_checked_here_not_by_the_inner_engine(tmp_path: Path) -> None:
    inner = Inner()
    fs = FewShotEngine(inner, tmp_path, ())
    long_label = ClassifyTask("t", (), examples=(("a", "x" * 5000), ("b", "y")))
    with pytest.raises(InvalidRequest, match="characters"):
        fs.check("m", long_label)
    one_label = ClassifyTask("t", (), examples=(("a", "x"), ("b", "x")))
    with pytest.raises(InvalidRequest, match="2 distinct labels"):
        fs.check("m", one_label)
    # NUL marks out-of-scope examples inside a set: no request label may carry it.
    nul = ClassifyTask("t", (), examples=(("a", "x\x00none"), ("b", "y"), ("c", "z")))
    with pytest.raises(InvalidRequest, match="NUL"):
        fs.check("m", nul)
    fs.check("m", ClassifyTask("t", (), task="anything"))  # config tasks were checked at load
    assert inner.checked == []
    with pytest.raises(InvalidRequest, match="text is empty"):
        await fs.run("m", ClassifyTask("", (), examples=tuple(ROWS)), "alice")
    assert inner.runs == []


async def test_a_task_answer_is_stamped_with_the_model_and_its_timings(tmp_path: Path) -> None:
    inner = Inner()
    ticks = itertools.count()
    fs = FewShotEngine(
        inner, tmp_path / "cache", (task_config(tmp_path),), clock=lambda: float(next(ticks))
    )
    with pytest.raises(Unavailable, match="being prepared"):
        await fs.run("m", ClassifyTask("my card has not arrived", (), task="intents"), "alice")
    await fs.prepare()
    assert fs.progress == {"intents": "ready"}
    # Building embedded the examples as background work, under the tasks' own queue key.
    assert inner.runs and all(bg and caller == "sidecar:task" for _, _, caller, _, bg in inner.runs)
    inner.runs.clear()
    r = await fs.run("m", ClassifyTask("my card has not arrived", (), task="intents"), "alice")
    assert isinstance(r, Classification) and r.label == "card_arrival"
    # The text itself is embedded live, for the caller who asked.
    ((_, query, caller, _, background),) = inner.runs
    assert isinstance(query, EmbedTask) and (caller, background) == ("alice", False)
    assert r.model == REF
    assert r.timings.queue_ms == QUEUE_MS  # what the request's own job waited
    assert r.timings.total_ms == r.timings.first_token_ms == 1000.0  # one clock tick
    assert fs.label_names("intents") == ["card_arrival", "exchange_rate", "pin"]


def test_thresholds_are_live_and_the_rest_of_a_task_is_not(tmp_path: Path) -> None:
    unset = task_config(tmp_path)
    fs = FewShotEngine(Inner(), tmp_path, (unset, task_config(tmp_path, name="set", threshold=0.7)))
    assert fs.threshold("intents") is None  # -1: the cloud's classify_threshold applies
    assert fs.threshold("set") == 0.7
    assert fs.threshold("unknown") is None
    assert fs.scope_alpha("intents") == 0.05 and fs.scope_alpha("unknown") is None
    changed = task_config(tmp_path, threshold=0.9, label_scoring=True, cascade=True,
                          scope_alpha=0.1, none_label="other")  # fmt: skip
    fs.retune((changed, task_config(tmp_path, name="new", threshold=0.5)))
    assert fs.threshold("intents") == 0.9 and fs.scope_alpha("intents") == 0.1
    # Only the threshold and the out-of-scope cut.
    assert fs.tasks["intents"] == replace(unset, threshold=0.9, scope_alpha=0.1)
    assert fs.threshold("new") is None and "new" not in fs.tasks  # a new task needs a restart
