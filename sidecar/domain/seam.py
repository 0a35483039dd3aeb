"""The seams front ends call: `Engine` for inference, `Admin` for running the daemon.

Engines wrap engines, as httpx transports wrap transports: the router (cloud escalation)
wraps few-shot (Classify by examples) which wraps the local pool of workers. A front end
(gRPC servicer, OpenAI-compatible HTTP) holds an `Engine` and knows nothing of what is
below it; tests hand it a real stack over fake workers.

`Admin` is the other half of what a front end may see: reports, swaps, the store and
updates, implemented once (`sidecar.admin.DaemonAdmin`) over the parts that do the work.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from sidecar.domain.admin import (
    ModelReport,
    ResidencyChange,
    StatusReport,
    StoredVersion,
    StoreListing,
)
from sidecar.domain.progress import Progress
from sidecar.domain.status import PoolStatus, SwapResult
from sidecar.domain.types import (
    Generation,
    ModelRef,
    Result,
    RouteRequest,
    StreamableTask,
    Task,
    TokenEvent,
)
from sidecar.domain.updates import Check, Outcome

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

    def adapter_ref(self, model: str, adapter: str) -> ModelRef:
        """The version of `model`'s LoRA adapter `adapter` a request would run with now.
        Raises ModelNotFound (it has none) or InvalidRequest (not a name)."""
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


class EngineWrapper:
    """An engine that passes everything to `inner`: a wrapper overrides only what it adds
    (the router its escalation, few-shot its Classify by examples, the metrics their call
    labels), so the seam's plumbing is written once."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner

    @property
    def default_model(self) -> str:
        return self.inner.default_model

    @property
    def ready(self) -> bool:
        return self.inner.ready

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    def ref(self, model: str) -> ModelRef:
        return self.inner.ref(model)

    def adapter_ref(self, model: str, adapter: str) -> ModelRef:
        return self.inner.adapter_ref(model, adapter)

    def check(self, model: str, task: Task) -> None:
        self.inner.check(model, task)

    async def run(
        self,
        model: str,
        task: Task,
        caller: str,
        *,
        route: RouteRequest = DEFAULT_ROUTE,
        background: bool = False,
    ) -> Result:
        return await self.inner.run(model, task, caller, route=route, background=background)

    def stream(
        self, model: str, task: StreamableTask, caller: str, *, route: RouteRequest = DEFAULT_ROUTE
    ) -> AsyncIterator[TokenEvent | Generation]:
        return self.inner.stream(model, task, caller, route=route)

    def status(self) -> list[tuple[PoolStatus, bool]]:
        return self.inner.status()


class Admin(Protocol):
    """What the Admin service asks of the daemon: reports, swaps, the store, updates.

    A model name "" means the default model; names are checked here, not by the caller.
    Store and file work runs off the event loop. Errors are domain errors (ModelNotFound,
    FailedPrecondition, SwapRefused...), mapped to status codes by the front end.
    """

    def status(self) -> StatusReport: ...

    def models(self) -> list[ModelReport]:
        """Every model's report (the `models` of `status()`, without the rest)."""
        ...

    async def swap(
        self, model: str, version: str, path: Path | None, strategy: str, progress: Progress
    ) -> SwapResult:
        """Swap `model` to a stored `version` or the file at `path`; "" strategy = the
        configured one. Raises SwapRefused (the old model keeps serving)."""
        ...

    async def versions(self) -> StoreListing: ...

    async def add_model(self, model: str, path: Path, adapter_for: str = "") -> StoredVersion:
        """Copy the file at `path` into the store under `model`, verified; serves nothing.
        With `adapter_for`: a LoRA adapter named `model` of that model, checked against it,
        proven on a worker and then active (SwapRefused if it is not proven)."""
        ...

    async def remove_version(self, model: str, version: str) -> None:
        """Refused (FailedPrecondition) while a worker maps it or it is active."""
        ...

    async def collect_garbage(self, empty_quarantine: bool) -> list[str]:
        """Delete what no name and no worker uses; the paths removed, relative to the store."""
        ...

    async def check_update(self, model: str, ignore_rollout: bool = False) -> Check: ...

    async def apply_update(
        self, model: str, progress: Progress, owner: object, ignore_rollout: bool = False
    ) -> Outcome:
        """Fetch, rebuild, verify and install the update `model`'s origin offers. `owner`
        names the caller, so only it can `abandon_update` this run. `ignore_rollout`: even
        when this daemon is outside the version's staged rollout (a manual canary)."""
        ...

    def abandon_update(self, model: str, owner: object) -> bool:
        """Stop `owner`'s update of `model` unless it reached install (its partial files stay
        for the next apply). False: nothing of `owner`'s was running, or it went too far."""
        ...

    def logs(self, lines: int, follow: bool) -> AsyncIterator[tuple[str, int]]:
        """The daemon's last `lines` log lines (0 = all it keeps) as it formats them, then,
        with `follow`, each new one until the caller leaves: (text, lines lost before it)."""
        ...

    async def load(self, model: str) -> ResidencyChange:
        """Load `model` now (making room in the memory budget first). Raises what the load
        refused: FailedPrecondition (no file, never fits), Overloaded (budget held by busy
        models), the worker's start error."""
        ...

    async def unload(self, model: str) -> ResidencyChange:
        """Stop `model`'s workers; the next request loads it again. FailedPrecondition while
        requests are in flight."""
        ...
