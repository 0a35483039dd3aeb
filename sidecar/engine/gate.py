"""The eval gate: a candidate scored on a golden set after its canary, before the flip.

`models.NAME.eval = "TASK"` names a config task whose `eval_file` is the golden set (rows
of text and the right label). The candidate answers each row with a zero-shot Classify
over the set's labels (and the task's instruction), on its own proven workers, which serve
nothing yet; the score is the accuracy. It is refused when it is below
`eval_min_accuracy`, or more than `eval_max_regression` below the serving version's score.
Either way a JSON report of the run is written under the store.

The serving version's score is cached per version (`<store>/eval/NAME/scores.json`, with
the golden set's digest, so a changed set, labels or instruction makes it stale): a swap
evaluates only the candidate once the serving version has been scored. The first time, the
serving version is scored through its own pool as background work (live requests first),
before anything of the candidate is loaded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sidecar.config import ModelConfig, TaskConfig
from sidecar.domain.errors import FailedPrecondition, Overloaded, SidecarError, SwapRefused
from sidecar.domain.progress import Progress
from sidecar.domain.types import Classification, ClassifyTask
from sidecar.engine.pool import GATE_CALLER, VERSION_CHARS, Event, ModelPool
from sidecar.engine.residency import LOADED
from sidecar.engine.slots import Slot

# Pure modules (the CSV reader and the scores of `sidecar eval`), imported across the layers
# on purpose: one reading of a labelled set and one accuracy, for the CLI and the gate.
from sidecar.evaluation.dataset import Columns, EvalInputError, load_classify
from sidecar.evaluation.scores import accuracy

log = logging.getLogger("sidecar.swap")

METHOD = "zero-shot classify/1"  # part of the digest: a new way of asking makes scores stale
ROW_TIMEOUT_S = 120.0  # as the canary's: a worker that cannot answer one row is not fit
REPORTS_KEPT = 20  # the newest gate reports per model; older ones are deleted
RETRY_S = 0.1  # the serving pool's queue is full of live requests: they go first


@dataclass(frozen=True)
class Golden:
    task: str
    source: Path
    rows: tuple[tuple[str, str], ...]  # (text, right label)
    labels: tuple[str, ...]
    instruction: str
    digest: str  # of the rows, the labels, the instruction and METHOD


@dataclass(frozen=True)
class Score:
    correct: int
    rows: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.rows if self.rows else 0.0

    def shown(self) -> str:
        return f"{self.accuracy:.3f} ({self.correct}/{self.rows})"


@dataclass(frozen=True)
class Bars:
    min_accuracy: float
    max_regression: float

    @staticmethod
    def of(config: ModelConfig) -> Bars:
        return Bars(config.eval_min_accuracy, config.eval_max_regression)


def load_golden(task: TaskConfig) -> Golden:
    """The golden set of `task` (its eval_file); FailedPrecondition when it cannot be read,
    so a swap stops before anything loads and no candidate is blamed for it."""
    if task.eval_file is None:
        raise FailedPrecondition(f"task {task.name!r} has no eval_file")
    columns = Columns(text=task.text_column, label=task.label_column)
    try:
        evalset = load_classify(Path(task.eval_file), columns)
    except EvalInputError as e:
        raise FailedPrecondition(f"the eval gate's golden set (task {task.name!r}): {e}") from None
    # The rows as read, not the file's bytes: other text/label columns are another set.
    h = hashlib.sha256(METHOD.encode())
    for part in (
        task.instruction,
        *evalset.labels,
        *(f"{r.text}\0{r.label}" for r in evalset.rows),
    ):
        h.update(b"\1" + part.encode())
    return Golden(
        task.name,
        Path(task.eval_file),
        tuple((r.text, r.label) for r in evalset.rows),
        evalset.labels,
        task.instruction,
        h.hexdigest(),
    )


def verdict(candidate: Score, serving: Score | None, bars: Bars) -> str | None:
    """Why the candidate is refused, or None. A hair of tolerance, so that a bar of 0.05 on
    20 rows allows exactly one row and float rounding decides nothing."""
    if candidate.accuracy < bars.min_accuracy - 1e-9:
        return f"below eval_min_accuracy {bars.min_accuracy:g}"
    if serving is not None and serving.accuracy - candidate.accuracy > bars.max_regression + 1e-9:
        return f"more than eval_max_regression {bars.max_regression:g} below the serving version"
    return None


class ScoreCache:
    """Each version's score on the golden set: sha256 -> accuracy, rows, digest, date."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # none yet, or unreadable: scores are only ever re-measured
        return doc if isinstance(doc, dict) else {}

    def get(self, sha: str, digest: str) -> Score | None:
        entry = self._read().get(sha)
        if not isinstance(entry, dict) or entry.get("golden") != digest:
            return None  # another golden set (or labels, instruction): stale
        try:
            return Score(int(entry["correct"]), int(entry["rows"]))
        except (KeyError, TypeError, ValueError):
            return None

    def put(self, sha: str, digest: str, score: Score, task: str) -> None:
        doc = {
            k: v
            for k, v in self._read().items()
            if isinstance(v, dict) and v.get("golden") == digest
        }
        doc[sha] = {
            "accuracy": score.accuracy,
            "correct": score.correct,
            "rows": score.rows,
            "golden": digest,
            "task": task,
            "date": _now(),
        }
        _write_json(self.path, doc)


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(doc, indent=1, sort_keys=True))
    partial.replace(path)


Ask = Callable[[ClassifyTask], Awaitable[Event]]


async def score(golden: Golden, lanes: list[Ask], who: str) -> tuple[Score, list[str]]:
    """Every row asked once, `len(lanes)` at a time; the answers in row order. A row whose
    request fails counts as wrong (its answer is the error); a row with no answer within
    ROW_TIMEOUT_S stops the run (TimeoutError)."""
    answers = [""] * len(golden.rows)
    rows = iter(range(len(golden.rows)))

    async def lane(ask: Ask) -> None:
        for i in rows:  # one shared iterator: each row goes to whichever lane is free
            text, _ = golden.rows[i]
            task = ClassifyTask(text, golden.labels, golden.instruction)
            event = await asyncio.wait_for(ask(task), ROW_TIMEOUT_S)
            if isinstance(event, Classification):
                answers[i] = event.label
            elif isinstance(event, SidecarError):
                answers[i] = f"error: {event.message}"
                log.warning("eval gate: %s row %d failed: %s", who, i + 1, event.message)

    running = [asyncio.ensure_future(lane(a)) for a in lanes]
    try:
        await asyncio.gather(*running)
    finally:  # one lane timed out (or the swap was cancelled): the others stop too
        for t in running:
            t.cancel()
    gold = [label for _, label in golden.rows]
    correct = round(accuracy(gold, answers) * len(gold))
    return Score(correct, len(gold)), answers


class Gate:
    """One swap's gate: the serving score first (`prepare`), the candidate's later (`check`)."""

    def __init__(self, root: Path, config: ModelConfig, golden: Golden) -> None:
        self.dir = root / "eval" / config.name
        self.config = config
        self.golden = golden
        self.bars = Bars.of(config)
        self.cache = ScoreCache(self.dir / "scores.json")
        self.serving: Score | None = None
        self.serving_sha = ""
        self.serving_cached = False
        self.serving_note = ""

    async def prepare(self, pool: ModelPool, progress: Progress) -> None:
        """The serving version's score: cached, or measured now on its own workers."""
        g = self.golden
        sha = pool.spec.path.stem  # a store blob is named by its sha256
        self.serving_sha = sha
        cached = await asyncio.to_thread(self.cache.get, sha, g.digest)
        if cached is not None:
            self.serving, self.serving_cached = cached, True
            progress("eval", f"serving {sha[:VERSION_CHARS]} scored {cached.shown()} (cached)")
            return
        if pool.residency != LOADED or not pool.ready:
            self.serving_note = "the serving version is not loaded: only eval_min_accuracy applies"
            progress("eval", self.serving_note)
            return
        progress(
            "eval",
            f"scoring the serving version {sha[:VERSION_CHARS]} once on {g.task!r} "
            f"({len(g.rows)} rows; cached for later swaps)",
        )
        lanes: list[Ask] = [lambda t: through_queue(pool, t) for _ in pool.workers()]
        try:
            self.serving, _ = await score(g, lanes or [lambda t: through_queue(pool, t)], "serving")
        except TimeoutError:
            self.serving_note = (
                "the serving version did not answer in time: only eval_min_accuracy applies"
            )
            progress("eval", self.serving_note)
            return
        await asyncio.to_thread(self.cache.put, sha, g.digest, self.serving, g.task)
        progress("eval", f"serving {sha[:VERSION_CHARS]} scored {self.serving.shown()}")

    async def check(self, pool: ModelPool, slots: list[Slot], sha: str, progress: Progress) -> None:
        """Score the candidate on its unflipped workers; SwapRefused("eval") below the bars."""
        g = self.golden
        progress("eval", f"candidate {sha[:VERSION_CHARS]} on {g.task!r} ({len(g.rows)} rows)")
        lanes: list[Ask] = []
        for slot in slots:
            lanes += [_on(pool, slot)] * max(1, slot.capacity)
        started = time.monotonic()
        try:
            candidate, answers = await score(g, lanes, "candidate")
        except TimeoutError:
            raise SwapRefused(
                "eval", f"a golden row got no answer within {ROW_TIMEOUT_S:.0f}s"
            ) from None
        dead = [s for s in slots if s.info.state in ("dead", "stopped")]
        if dead:
            raise SwapRefused("eval", f"{len(dead)} worker(s) died on the golden set")
        seconds = time.monotonic() - started
        problem = verdict(candidate, self.serving, self.bars)
        report = self.dir / "reports" / f"{sha[:VERSION_CHARS]}.json"
        await asyncio.to_thread(self._report, report, sha, candidate, answers, seconds, problem)
        await asyncio.to_thread(self.cache.put, sha, g.digest, candidate, g.task)
        serving = (
            f"serving {self.serving_sha[:VERSION_CHARS]} scored {self.serving.shown()}"
            if self.serving is not None
            else "serving score unknown"
        )
        text = (
            f"candidate {sha[:VERSION_CHARS]} scored {candidate.shown()} on {g.task!r}, "
            f"{serving}; bars: eval_min_accuracy {self.bars.min_accuracy:g}, "
            f"eval_max_regression {self.bars.max_regression:g}"
        )
        if problem is not None:
            raise SwapRefused("eval", f"{text}: {problem}; report: {report}")
        progress("eval", f"passed: {text} ({seconds:.1f}s)")

    def _report(
        self,
        path: Path,
        sha: str,
        candidate: Score,
        answers: list[str],
        seconds: float,
        problem: str | None,
    ) -> None:
        g = self.golden
        serving = None
        if self.serving is not None:
            serving = {
                "sha256": self.serving_sha,
                "accuracy": self.serving.accuracy,
                "correct": self.serving.correct,
                "rows": self.serving.rows,
                "cached": self.serving_cached,
            }
        doc = {
            "model": self.config.name,
            "date": _now(),
            "golden": {
                "task": g.task,
                "file": str(g.source),
                "rows": len(g.rows),
                "labels": list(g.labels),
                "digest": g.digest,
                "method": METHOD,
            },
            "candidate": {
                "sha256": sha,
                "accuracy": candidate.accuracy,
                "correct": candidate.correct,
                "rows": candidate.rows,
                "seconds": round(seconds, 3),
            },
            "serving": serving,
            "serving_note": self.serving_note,
            "bars": {
                "eval_min_accuracy": self.bars.min_accuracy,
                "eval_max_regression": self.bars.max_regression,
            },
            "passed": problem is None,
            "refused_because": problem or "",
            "answers": [
                {"text": text, "label": label, "answer": answer}
                for (text, label), answer in zip(g.rows, answers, strict=True)
            ],
        }
        _write_json(path, doc)
        reports = sorted(path.parent.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for old in reports[:-REPORTS_KEPT]:
            old.unlink(missing_ok=True)


def _on(pool: ModelPool, slot: Slot) -> Ask:
    return lambda task: pool.run_on(slot, task)


async def through_queue(pool: ModelPool, task: ClassifyTask) -> Event:
    """One row on the serving pool as background work: live requests go first."""
    while True:
        try:
            job = pool.submit(task, GATE_CALLER, stream=False, background=True)
        except Overloaded:
            await asyncio.sleep(RETRY_S)
            continue
        try:
            return await job.events.get()
        finally:
            pool.cancel(job)
