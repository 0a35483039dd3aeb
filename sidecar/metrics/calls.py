"""Which model and which class of caller the work under way is for, for the token counters.

A caller's key (`sidecar.calls.callers`, `sidecar.server.caller`) holds a uid and pid, a
hashed token, an application's own name or a peer address: unbounded, so it never becomes
a label (every new value is a new time series, kept for weeks by Prometheus). Its prefix
does, as one of a few classes.

`CallLabels` is an engine wrapping the engine the front ends are handed (engines wrap
engines, see `sidecar.domain.seam`): it notes the request's model and caller class in a
context variable and changes nothing else. The hooks that count tokens read it where the
tokens are known: the local pool for every local answer (an answer the router then
escalates cost local work too) and the router for cloud answers. Work the daemon starts
itself (config tasks embedding their examples) runs outside any call: class "internal".
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Collection
from contextvars import ContextVar
from dataclasses import dataclass

from sidecar.domain.seam import DEFAULT_ROUTE, Engine, EngineWrapper
from sidecar.domain.types import (
    Generation,
    Result,
    RouteRequest,
    StreamableTask,
    Task,
    TokenEvent,
)

# The caller key's prefix -> its class. gRPC over the Unix socket: "uid:" (kernel
# credentials); a bearer token: "token:"; a named application without one: "app:"; what the
# transport knew of the peer: "peer:" (gRPC over TCP) or "http:" (the HTTP endpoint).
_PREFIXES = {"uid": "uid", "token": "token", "app": "app", "peer": "peer", "http": "peer"}
INTERNAL = "internal"
CALLER_CLASSES = ("uid", "token", "app", "peer", INTERNAL, "other")


def caller_class(caller: str) -> str:
    """The bounded class of a caller key: one of CALLER_CLASSES."""
    prefix, sep, _ = caller.partition(":")
    return _PREFIXES.get(prefix, "other") if sep else "other"


@dataclass(frozen=True)
class Call:
    model: str  # a configured model name, or "unknown"
    caller_class: str


_current: ContextVar[Call | None] = ContextVar("sidecar_metrics_call", default=None)


def current() -> Call | None:
    """The call the running task works for (None: the daemon's own work)."""
    return _current.get()


class CallLabels(EngineWrapper):
    """An `Engine` over `inner` that labels the work of each call (see the module doc)."""

    def __init__(self, inner: Engine, models: Collection[str]) -> None:
        super().__init__(inner)
        self._models = frozenset(models)

    def _call(self, model: str, caller: str) -> Call:
        name = model or self.inner.default_model
        return Call(name if name in self._models else "unknown", caller_class(caller))

    async def run(
        self,
        model: str,
        task: Task,
        caller: str,
        *,
        route: RouteRequest = DEFAULT_ROUTE,
        background: bool = False,
    ) -> Result:
        token = _current.set(self._call(model, caller))
        try:
            return await self.inner.run(model, task, caller, route=route, background=background)
        finally:
            _current.reset(token)

    async def stream(
        self, model: str, task: StreamableTask, caller: str, *, route: RouteRequest = DEFAULT_ROUTE
    ) -> AsyncIterator[TokenEvent | Generation]:
        # A generator shares its consumer's context: the variable is set for the task that
        # iterates it, and reset when the stream ends there. A stream finalised elsewhere
        # (garbage-collected unfinished) cannot reset it in that other context: harmless,
        # that context belongs to no call any more.
        token = _current.set(self._call(model, caller))
        try:
            async for event in self.inner.stream(model, task, caller, route=route):
                yield event
        finally:
            with contextlib.suppress(ValueError):
                _current.reset(token)
