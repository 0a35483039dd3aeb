"""The Engine seam: the one interface front ends call and engines implement.

Engines wrap engines, as httpx transports wrap transports: the router (cloud escalation)
wraps few-shot (Classify by examples) which wraps the local pool of workers. A front end
(gRPC servicer, OpenAI-compatible HTTP) holds an `Engine` and knows nothing of what is
below it; tests hand it a real stack over fake workers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from sidecar.domain.status import PoolStatus
from sidecar.domain.types import (
    Generation,
    ModelRef,
    Result,
    RouteRequest,
    StreamableTask,
    Task,
    TokenEvent,
)

DEFAULT_ROUTE = RouteRequest()


class Engine(Protocol):
    @property
    def default_model(self) -> str:
        """The model a request naming none gets."""
        ...

    @property
    def ready(self) -> bool:
        """Every model has a worker that answered its canary."""
        ...

    async def start(self) -> None: ...
    async def close(self) -> None: ...

    def ref(self, model: str) -> ModelRef:
        """The name and version `model` ("" = the default) is served as now.
        Raises ModelNotFound."""
        ...

    def check(self, model: str, task: Task) -> None:
        """Refuse bad input against `model`'s limits before any work is queued.
        Raises InvalidRequest (or a subclass) or ModelNotFound."""
        ...

    async def run(
        self,
        model: str,
        task: Task,
        caller: str,
        *,
        route: RouteRequest = DEFAULT_ROUTE,
        background: bool = False,
    ) -> Result:
        """Answer `task`. `caller` is the fair-queueing key; `route` is how the caller wants
        it routed (engines below the router ignore it); a `background` job runs only when
        no live request waits."""
        ...

    def stream(
        self, model: str, task: StreamableTask, caller: str, *, route: RouteRequest = DEFAULT_ROUTE
    ) -> AsyncIterator[TokenEvent | Generation]:
        """Tokens as they are decoded, then the final Generation."""
        ...

    def status(self) -> list[tuple[PoolStatus, bool]]:
        """Each model's pool and whether it is the default."""
        ...
