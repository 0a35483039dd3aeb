"""The rows of a labelled set through the running daemon, a few at a time.

Each row is one ordinary request (Classify or Extract) from a thread pool sharing one
client, so what is measured is what a caller gets: the reply, its confidence, the tokens
and the round trip. A row whose request fails is recorded with the error and the run goes
on (one malformed text must not cost a long run); the report counts it as wrong, unless the
daemon did not get to answer it (`Reply.unanswered`: a timeout, no worker, a full queue),
which says nothing of the model and is listed apart.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sidecar.client import Client, SidecarError
from sidecar.evaluation.dataset import EvalSet, Row


@dataclass
class Reply:
    """What one row got back."""

    answer: str = ""  # the label, or the JSON text
    parsed: dict[str, Any] | None = None  # Extract: the object (None: not an object)
    score: float | None = None  # the confidence AUTO compares: probability, or mean logprob
    probability: float | None = None  # the same as a probability, for calibration
    ms: float = 0.0  # round trip, as the caller sees it
    queue_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    served_by: str = "local"
    reason_code: str = ""
    cost: float = 0.0
    model: str = ""  # name@version that answered
    error: str = ""  # the request failed: its status and message
    status: str = ""  # the request failed: its gRPC status name
    cause: str = ""  # the router's one-word reason for refusing ("sensitive": kept local)
    threshold: float | None = None  # what the daemon held the local confidence to
    threshold_source: str = ""  # where that threshold came from (config key, fitted entry)

    @property
    def local(self) -> bool:
        return not self.error and self.served_by in ("", "local")

    @property
    def unanswered(self) -> bool:
        """The daemon could not get to it (timed out, no worker, queue full): no answer to
        score, rather than a wrong one."""
        return self.status in UNANSWERED


UNANSWERED = frozenset({"DEADLINE_EXCEEDED", "UNAVAILABLE", "RESOURCE_EXHAUSTED"})


def _classify(c: Client, s: EvalSet, row: Row, model: str, routing: str, low: bool) -> Reply:
    r = c.classify(row.text, s.labels, task=s.task, model=model, routing=routing,  # type: ignore[arg-type]
                   low_priority=low, sensitive=row.sensitive)  # fmt: skip
    local = r.route.served_by in ("", "local")
    p = r.confidence.top_probability if local else _local(r.route)
    return Reply(answer=r.label, score=p, probability=p, **_common(r))


def _extract(c: Client, s: EvalSet, row: Row, model: str, routing: str, low: bool) -> Reply:
    r = c.extract(row.text, dict(s.schema), model=model, routing=routing,  # type: ignore[arg-type]
                  low_priority=low, sensitive=row.sensitive)  # fmt: skip
    try:
        doc = json.loads(r.json)
    except json.JSONDecodeError:
        doc = None
    local = r.route.served_by in ("", "local")
    lp = r.confidence.mean_logprob if local else _local(r.route)
    return Reply(
        answer=r.json,
        parsed=doc if isinstance(doc, dict) else None,
        score=lp,
        # The geometric mean of the tokens' probabilities: a probability to calibrate.
        probability=math.exp(lp) if lp is not None else None,
        **_common(r),
    )


def _local(route: Any) -> float | None:
    return route.local_confidence if route.HasField("local_confidence") else None


def _common(r: Any) -> dict[str, Any]:
    return {
        "queue_ms": r.timings.queue_ms,
        "prompt_tokens": r.usage.prompt_tokens,
        "completion_tokens": r.usage.completion_tokens,
        "served_by": r.route.served_by or "local",
        "reason_code": r.route.reason_code,
        "cost": r.route.cost,
        "model": f"{r.model.name}@{r.model.version}",
        "threshold": r.route.threshold if r.route.HasField("threshold") else None,
        "threshold_source": r.route.threshold_source,
    }


ASK: dict[str, Callable[[Client, EvalSet, Row, str, str, bool], Reply]] = {
    "classify": _classify,
    "extract": _extract,
}


def run(
    client: Client,
    evalset: EvalSet,
    *,
    model: str = "",
    routing: str = "LOCAL_ONLY",
    concurrency: int = 2,
    low_priority: bool = True,
    on_row: Callable[[int, Reply], None] | None = None,
) -> tuple[list[Reply], float]:
    """Every row's reply, in the set's order, and the wall seconds the run took.
    `on_row(i, reply)` is called as each row ends (from one thread at a time)."""
    ask = ASK[evalset.kind]
    out: list[Reply] = [Reply() for _ in evalset.rows]
    lock = threading.Lock()

    def one(i: int) -> None:
        started = time.perf_counter()
        try:
            reply = ask(client, evalset, evalset.rows[i], model, routing, low_priority)
        except SidecarError as e:
            cause = dict(list(e.trailing_metadata() or ())).get("sidecar-cause", "")
            status = e.status_code.name
            reply = Reply(error=f"{status}: {e.message}", status=status, cause=str(cause))
        reply.ms = (time.perf_counter() - started) * 1000
        out[i] = reply
        if on_row is not None:
            with lock:
                on_row(i, reply)

    started = time.perf_counter()
    pool = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="eval")
    try:
        for f in [pool.submit(one, i) for i in range(len(evalset.rows))]:
            f.result()
    except BaseException:
        # Ctrl-C (or a failing callback): the rows not started are dropped, not run; only
        # the requests already sent (at most `concurrency`) are waited for at exit.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return out, time.perf_counter() - started
