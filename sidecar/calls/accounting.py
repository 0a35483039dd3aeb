"""One log line and one metrics sample per request, whichever front end served it.

gRPC (the interceptor) and the OpenAI-compatible HTTP endpoint both end every request
here, so dashboards and `sidecar status` count them in one vocabulary: the status is
always a gRPC status code name, the `rpc` label names the method or HTTP route.

A streamed admin call starts work that outlives it (a swap runs to its end even if its
caller leaves; so does an update once it installs). Such a call's line carries the work's
outcome, written when the work ends, not CANCELLED when the caller left: the log and the
counters say what happened to the model. The servicer names that work with
`outlives_call`; the interceptor, which opened the call's `Work` slot, reads it.
"""

from __future__ import annotations

import asyncio
import logging
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar

log = logging.getLogger("sidecar.request")
T = TypeVar("T")


class Work:
    """The slot of one call for the work it started that outlives it (None: none)."""

    future: asyncio.Future[Any] | None = None


_work: ContextVar[Work | None] = ContextVar("sidecar_call_work", default=None)


def open_work() -> Work:
    """A fresh slot for the call running in this task (the interceptor, at its start). The
    interceptor keeps the slot itself: its end of the call may run in another task."""
    slot = Work()
    _work.set(slot)
    return slot


def outlives_call(work: asyncio.Future[T]) -> asyncio.Future[T]:
    """Name `work` as what this call does: it goes on if the caller leaves, and the call is
    logged with its outcome when it ends."""
    slot = _work.get()
    if slot is not None:
        slot.future = work
    return work


class RequestCounter(Protocol):
    """Where a request's sample goes (the daemon's `Metrics`)."""

    def request(self, rpc: str, model: str, status: str, seconds: float) -> None: ...


class RequestLog:
    def __init__(self, metrics: RequestCounter, default_model: str, models: frozenset[str]) -> None:
        self.metrics = metrics
        self._default_model = default_model
        self._models = models

    def record(
        self,
        rid: str,
        method: str,
        rpc: str,
        model: str | None,
        status: str,
        seconds: float,
        **extra: object,
    ) -> None:
        """`model` is None for calls that take no model (health, Status), "" for the default."""
        label = model or (self._default_model if model is not None else "-")
        if model and model not in self._models:
            label = "unknown"  # a caller's typo must not mint a new time series
        self.metrics.request(rpc, label, status, seconds)
        ms = seconds * 1000
        fields: dict[str, object] = {
            "id": rid,
            "method": method,
            "model": model or "",
            "status": status,
        }
        fields |= {"ms": round(ms, 2), **extra}
        shown = "".join(f" {k}={v}" for k, v in extra.items())
        log.info(
            "%s %s model=%s status=%s%s ms=%.1f",
            rid,
            method,
            model or "-",
            status,
            shown,
            ms,
            extra={"request": fields},
        )
