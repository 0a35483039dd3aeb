"""After an install: watch the new version for `update.healthy_seconds`; if a worker of it
dies, a readiness probe fails, or (with `models.NAME.probation_latency_factor`) its live p99
latency exceeds that many times the previous version's, swap the previous version back and
keep the reason (step 6 of an update). What is on probation, the previous p99 included, is
kept in the state, so it survives a restart.

An adapter ("MODEL:ADAPTER") installed by an update is watched alike, with its model's
workers and probe (an adapter runs in them) and its own versions' latencies (only the
requests that asked for it), and one more sign: a live request with it that a worker
failed (it could not be loaded or applied there, or an internal error); a rollback
activates the adapter version the update replaced. A swap of the model to a file the
adapter does not fit ends its probation (recorded), rolling nothing back.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any

from sidecar.domain.errors import SidecarError
from sidecar.engine import adapters as adapter_swap
from sidecar.engine.latency import Latencies
from sidecar.engine.pool import ModelPool
from sidecar.update.context import UpdateContext
from sidecar.update.state import State

log = logging.getLogger("sidecar.update")


def record(
    sha: str,
    version: int,
    previous: str,
    previous_version: int,
    healthy_s: float,
    previous_p99: float | None,
) -> dict[str, Any]:
    """What an installed version on probation is kept as in its update state (`watch` reads
    it): what to swap back to, until when, and the p99 to compare with."""
    return {
        "sha256": sha,
        "version": version,
        "previous": previous,
        "previous_version": previous_version,
        "until": time.time() + healthy_s,
        "previous_p99_ms": previous_p99,
    }


class Probation:
    def __init__(self, ctx: UpdateContext, probe_errors: dict[str, str | None]) -> None:
        self._ctx = ctx
        self._probe_errors = probe_errors
        # Worker restarts, probe error and (an adapter's) failed requests when probation
        # began: later changes are trouble.
        self._baseline: dict[str, tuple[int, str | None, int]] = {}

    def _pool(self, name: str) -> ModelPool:
        return self._ctx.engine.pool(name.partition(":")[0])

    def _health_marks(self, name: str) -> tuple[int, str | None, int]:
        pool = self._pool(name)  # an adapter's health is its model's workers', and its own
        failed = pool.adapter_failures.get(self._serving(name), (0, ""))[0] if ":" in name else 0
        return pool.status().restarts, self._probe_errors.get(pool.config.name), failed

    def _serving(self, name: str) -> str:
        """The version `name` serves now: a model's short version, an adapter's sha256
        ("" = none)."""
        base, _, adapter = name.partition(":")
        if not adapter:
            return self._ctx.engine.pool(base).ref.version
        file = self._ctx.engine.adapters.get(base, adapter)
        return file.sha256 if file is not None else ""

    def _not_fitting(self, name: str) -> str:
        """Why adapter `name` ("MODEL:ADAPTER") does not fit its model's serving file ("" =
        it fits, or `name` is a model)."""
        base, _, adapter = name.partition(":")
        return self._ctx.engine.adapters.misfit(base, adapter) if adapter else ""

    def _latencies(self, name: str) -> Latencies:
        pool = self._pool(name)
        return pool.adapter_latencies if ":" in name else pool.latencies

    def previous_p99(self, name: str, version: str) -> float | None:
        """`version`'s p99 of `name` now (None: too few requests): taken before a flip."""
        return self._latencies(name).p99(version)

    def begin(self, name: str) -> None:
        """The new version of `name` serves from now on: remember how healthy things are."""
        self._baseline[name] = self._health_marks(name)

    def _watched(self) -> list[str]:
        engine = self._ctx.engine
        return [
            name
            for base in list(engine.pools)
            for name in (base, *engine.adapters.names(base, prefixed=True))
        ]

    async def watch(self) -> None:
        """One pass over every model and adapter on probation."""
        ctx = self._ctx
        for name in self._watched():
            path = ctx.state_path(name)
            if not path.exists():
                continue
            st = State.load(path)
            p = st.probation
            if not p:
                continue
            serving = self._serving(name)
            if not serving or not p["sha256"].startswith(serving):
                st.probation = {}
                st.save(path)
                continue
            misfit = self._not_fitting(name)
            if misfit:
                # Its requests fail fast before any worker: nothing of its own to judge,
                # and a swap back would be checked against the same file.
                st.probation = {}
                st.save(path)
                self._baseline.pop(name, None)
                ctx.record(
                    name,
                    f"probation of v{p['version']} ({p['sha256'][:12]}) ended: superseded by "
                    f"a swap of its model to a file it does not fit: {misfit}",
                    logging.WARNING,
                )
                continue
            baseline = self._baseline.setdefault(name, self._health_marks(name))
            restarts, probe_error, failed = self._health_marks(name)
            trouble, cause = "", ""
            if restarts > baseline[0]:
                trouble, cause = f"{restarts - baseline[0]} worker restart(s)", "worker_died"
            elif probe_error and probe_error != baseline[1]:
                trouble, cause = f"readiness probe failed: {probe_error}", "probe_failed"
            elif failed > baseline[2]:
                last = self._pool(name).adapter_failures.get(serving, (0, ""))[1]
                trouble = f"{failed - baseline[2]} request(s) with it failed (last: {last})"
                cause = "requests_failed"
            elif slow := self._slower(name, serving, p):
                trouble, cause = slow, "latency"
            if trouble:
                await self._roll_back(name, st, trouble, cause)
            elif time.time() >= p["until"]:
                st.probation = {}
                st.save(path)
                self._baseline.pop(name, None)
                ctx.record(name, f"v{p['version']} served healthily for the probation period")

    def _slower(self, name: str, serving: str, p: dict[str, Any]) -> str:
        """What is wrong with the new version's latency ("" = nothing, or too few requests
        yet to tell, or no previous p99 to compare with)."""
        pool = self._pool(name)
        latencies = self._latencies(name)
        factor = pool.config.probation_latency_factor
        before = p.get("previous_p99_ms")
        if not factor or not isinstance(before, int | float) or before <= 0:
            return ""
        now = latencies.p99(serving)
        if now is None or now <= factor * before:
            return ""
        return (
            f"p99 latency {now:.0f} ms over the last {latencies.samples(serving)} requests, "
            f"more than {factor:g}x the previous version's {before:.0f} ms"
        )

    async def _swap_back(self, name: str, previous: str) -> None:
        # No eval gate on the way back: the previous version served until just now.
        base, _, adapter = name.partition(":")
        if not adapter:
            await self._ctx.engine.swap(name, version=previous, gate=False)
            return
        pool, table = self._ctx.engine.pool(base), self._ctx.engine.adapters
        await adapter_swap.activate(pool, table, adapter, previous, gate=False)

    async def _roll_back(self, name: str, st: State, trouble: str, cause: str) -> None:
        ctx = self._ctx
        p = st.probation
        why = f"unhealthy within {ctx.engine.config.update.healthy_seconds:.0f}s: {trouble}"
        previous = p["previous"]
        shown = previous[:12]
        log.error("update %s: v%s %s; rolling back to %s", name, p["version"], why, shown)
        when = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
        try:
            await self._swap_back(name, previous)
        except SidecarError as e:
            # The unhealthy version keeps serving: status and metrics must show it as loudly
            # as a rollback that worked (probation stays, so the next pass tries again).
            failed = (
                f"rollback of v{p['version']} ({p['sha256'][:12]}) to {shown} failed "
                f"at {when}: {e.message} (it was {why})"
            )
            self._rolled_back(name, failed, "rollback_failed")
            ctx.record(name, failed, logging.ERROR)
            return
        st = ctx.state(name)
        st.probation = {}
        st.failed[p["sha256"]] = why
        st.installed_version = int(p.get("previous_version") or 0)
        st.installed_sha256 = ""
        st.save(ctx.state_path(name))
        done = f"v{p['version']} ({p['sha256'][:12]}) rolled back to {shown} at {when}: {why}"
        self._rolled_back(name, done, cause)
        self._baseline.pop(name, None)
        ctx.reject(name, "unhealthy", f"v{p['version']} rolled back to {shown}: {why}")

    def _rolled_back(self, name: str, text: str, cause: str) -> None:
        # Kept apart from `last` (which the next check overwrites) and never sent anywhere:
        # status and metrics show it, for the operator's own monitoring.
        ctx = self._ctx
        path = ctx.state_path(name)
        st = State.load(path)
        st.last_rollback = text
        st.save(path)
        ctx.last_rollback[name] = text
        ctx.metrics.update_rollbacks.labels(name, cause).inc()
