"""The Admin seam (`sidecar.domain.seam.Admin`) over the parts that do the work.

Reports, swaps, the store and updates, as the Admin service offers them, each written
once here so that a front end only translates. Built by the daemon from its parts: the
local pool engine, the store, the supervisor, the updater, the metrics, and two callables
for what may not exist (the cloud report, the drop folder watcher's health).

Store work reads and writes files (a gc hashes nothing but may delete gigabytes): it runs
in a thread. What is in use is read on the event loop, where the pools live.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import psutil

from sidecar.domain.admin import (
    AdapterReport,
    CloudReport,
    ModelReport,
    ResidencyChange,
    StatusReport,
    StoredVersion,
    StoreListing,
)
from sidecar.domain.errors import FailedPrecondition
from sidecar.domain.names import check_name
from sidecar.domain.progress import Progress
from sidecar.domain.status import SwapResult
from sidecar.domain.updates import Check, Outcome
from sidecar.domain.versions import VersionInfo
from sidecar.engine import adapters as adapter_swap
from sidecar.engine.local import PoolEngine
from sidecar.logs import recent
from sidecar.metrics import Metrics
from sidecar.store import ModelStore, adapters
from sidecar.supervisor import Supervisor
from sidecar.update.updater import Updater


def _name(model: str) -> str:
    """A model name an admin call will touch the store with: checked (empty = the default)."""
    return check_name(model) if model else model


class DaemonAdmin:
    def __init__(
        self,
        engine: PoolEngine,
        store: ModelStore,
        supervisor: Supervisor,
        updater: Updater,
        metrics: Metrics,
        socket: Path,
        cloud: Callable[[], CloudReport | None] = lambda: None,
        *,
        last_reload: Callable[[], str] = lambda: "",
        drop_watcher: Callable[[], str] = lambda: "",
    ) -> None:
        self.engine = engine
        self.store = store
        self.supervisor = supervisor
        self.updater = updater
        self.metrics = metrics
        self.socket = socket
        self.cloud = cloud
        self.last_reload = last_reload  # how the last SIGHUP ended
        self.drop_watcher = drop_watcher  # the drop folder's health ("" = none watched)
        self.started = time.monotonic()

    # ---------------------------------------------------------------- reports

    def models(self) -> list[ModelReport]:
        errors = self.supervisor.probe_errors
        return [
            ModelReport(
                pool,
                is_default,
                errors.get(pool.model.name),
                self.updater.last.get(pool.model.name, ""),
                self.updater.fetching(pool.model.name),
                self.updater.rollout(pool.model.name),
                self.updater.last_rollback(pool.model.name),
                self._adapters(pool.model.name),
            )
            for pool, is_default in self.engine.status()
        ]

    def _misfit(self, v: VersionInfo) -> str:
        split = adapters.split(v.name)
        return self.engine.adapters.misfit(*split) if split is not None and v.active else ""

    def _adapters(self, model: str) -> tuple[AdapterReport, ...]:
        table, out = self.engine.adapters, []
        for name in table.names(model):
            file = table.get(model, name)
            full = f"{model}:{name}"
            out.append(
                AdapterReport(
                    name,
                    file.sha256[:12] if file is not None else "",
                    self.updater.last.get(full, ""),
                    self.updater.last_rollback(full),
                    table.misfit(model, name),
                )
            )
        return tuple(out)

    def status(self) -> StatusReport:
        return StatusReport(
            pid=os.getpid(),
            uptime_s=time.monotonic() - self.started,
            socket=str(self.socket),
            models=tuple(self.models()),
            counters=self.metrics.counts(),
            memory_available=psutil.virtual_memory().available,
            shedding=self.engine.shed_reason or "",
            last_reload=self.last_reload(),
            cloud=self.cloud(),
            drop_watcher=self.drop_watcher(),
        )

    # ---------------------------------------------------------------- swap

    async def swap(
        self, model: str, version: str, path: Path | None, strategy: str, progress: Progress
    ) -> SwapResult:
        adapter = adapters.split(model)
        if adapter is not None:
            return await self._swap_adapter(*adapter, version, path)
        return await self.engine.swap(
            _name(model), version=version, path=path, strategy=strategy, progress=progress
        )

    # ---------------------------------------------------------------- store

    async def versions(self) -> StoreListing:
        serving = {(s.model.name, s.model.version) for s, _ in self.engine.status()}
        stored = await asyncio.to_thread(self.store.all_versions)
        # An adapter serves once it is active: requests resolve to the active version.
        loras = await asyncio.to_thread(adapters.listing, self.store)
        return StoreListing(
            self.store.root,
            tuple(StoredVersion(v, (v.name, v.short) in serving) for v in stored)
            + tuple(StoredVersion(v, v.active, self._misfit(v)) for v in loras),
        )

    async def add_model(self, model: str, path: Path, adapter_for: str = "") -> StoredVersion:
        if adapter_for:
            return await self._add_adapter(adapter_for, model, path)
        name = _name(model) or self.engine.default_model
        sha = await asyncio.to_thread(self.store.add, path, name)
        return StoredVersion(await asyncio.to_thread(self.store.info, name, sha), serving=False)

    async def _add_adapter(self, base: str, name: str, path: Path) -> StoredVersion:
        pool = self.engine.pool(_name(base))
        base = pool.config.name
        sha = await asyncio.to_thread(
            adapters.add, self.store, base, pool.spec.path, check_name(name), path
        )
        await adapter_swap.activate(pool, self.engine.adapters, name, sha, fresh=True)
        info = await asyncio.to_thread(self.store.view(base).info, name, sha)
        return StoredVersion(replace(info, name=f"{base}:{name}"), serving=True)

    async def _swap_adapter(
        self, base: str, name: str, version: str, path: Path | None
    ) -> SwapResult:
        pool = self.engine.pool(base)
        if path is not None:
            sha = await asyncio.to_thread(
                adapters.add, self.store, pool.config.name, pool.spec.path, name, path
            )
        else:
            sha = self.store.view(pool.config.name).resolve(name, version)
        return await adapter_swap.activate(
            pool, self.engine.adapters, name, sha, fresh=path is not None
        )

    async def remove_version(self, model: str, version: str) -> None:
        adapter = adapters.split(model)
        if adapter is not None:
            view = self.store.view(self.engine.pool(adapter[0]).config.name)
            sha = view.resolve(adapter[1], version)
            await asyncio.to_thread(view.remove, adapter[1], sha, self.engine.in_use())
            return
        name = _name(model) or self.engine.default_model
        sha = self.store.resolve(name, version)
        await asyncio.to_thread(self.store.remove, name, sha, self.engine.in_use())

    async def collect_garbage(self, empty_quarantine: bool) -> list[str]:
        removed = await asyncio.to_thread(self.store.gc, self.engine.in_use())
        if empty_quarantine:
            emptied = await asyncio.to_thread(self.store.quarantine_cleanup, empty=True)
            removed += [f"quarantine/{e}" for e in emptied]
        return removed

    # ---------------------------------------------------------------- updates

    async def check_update(self, model: str, ignore_rollout: bool = False) -> Check:
        return await self.updater.check(model, ignore_rollout)

    async def apply_update(
        self, model: str, progress: Progress, owner: object, ignore_rollout: bool = False
    ) -> Outcome:
        return await self.updater.apply(model, progress, owner, ignore_rollout)

    def abandon_update(self, model: str, owner: object) -> bool:
        return self.updater.abandon(model, owner)

    # ---------------------------------------------------------------- logs

    async def logs(self, lines: int, follow: bool) -> AsyncIterator[tuple[str, int]]:
        buffer = recent()
        if buffer is None:
            raise FailedPrecondition(
                "this daemon keeps no recent log lines (its logging was not set up by "
                "`sidecar serve`)"
            )
        if not follow:
            kept, _ = buffer.tail(lines)
            for text in kept:
                yield text, 0
            return
        async for line in buffer.follow(lines):
            yield line

    # ---------------------------------------------------------------- residency

    async def load(self, model: str) -> ResidencyChange:
        return await self._residency(model, self.engine.load)

    async def unload(self, model: str) -> ResidencyChange:
        return await self._residency(model, self.engine.unload)

    async def _residency(
        self, model: str, change: Callable[[str], Awaitable[bool]]
    ) -> ResidencyChange:
        name = self.engine.pool(_name(model)).config.name
        started = time.monotonic()
        changed = await change(name)
        report = next(m for m in self.models() if m.pool.model.name == name)
        return ResidencyChange(report, changed, time.monotonic() - started)
