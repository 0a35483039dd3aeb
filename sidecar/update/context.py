"""What every step of an update shares: the engine it installs into, the metrics, each
model's work folder and state on disk, the job in flight, and the record of what happened
(kept for status, logged, and saved in the state)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sidecar.config import ModelConfig
from sidecar.domain.errors import (
    Cancelled,
    FailedPrecondition,
    SidecarError,
    SwapRefused,
    Unavailable,
)
from sidecar.engine.local import PoolEngine
from sidecar.metrics import Metrics
from sidecar.update import fetch
from sidecar.update.identity import Identity, resolve
from sidecar.update.manifest import parse_public_key
from sidecar.update.state import Job, Offered, State

log = logging.getLogger("sidecar.update")


class UpdateContext:
    def __init__(self, engine: PoolEngine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.jobs: dict[str, Job] = {}
        # Per model, what status and scrapes report: kept here (set where it changes, read
        # from the state files once at start) so that neither reads a file on the loop.
        self.last: dict[str, str] = {}
        self.offered: dict[str, Offered] = {}  # the newest manifest's version and rollout
        self.last_rollback: dict[str, str] = {}
        self._fallback: Identity | None = None  # without update.identity (file I/O: at start)

    # ---------------------------------------------------------------- where and what

    def model(self, name: str) -> ModelConfig:
        """`name`'s config, refused unless it has an update origin and key. An adapter
        ("MODEL:ADAPTER") comes from its model's origin, signed by the model's key."""
        pool = self.engine.pool(name.partition(":")[0])
        m = self.engine.config.model(pool.config.name) or pool.config
        if not m.update_origin or not m.update_key:
            raise FailedPrecondition(
                f"model {m.name!r} has no update origin: set models.{m.name}.update_origin "
                f"and models.{m.name}.update_key"
            )
        return m

    def load(self) -> None:
        """Read what status reports from the state files, and this daemon's identity, once at
        start (blocking: run in a thread)."""
        adapters = self.engine.adapters  # read by the engine's start, before this
        for name in [
            n for base in self.engine.pools for n in (base, *adapters.names(base, prefixed=True))
        ]:
            try:
                st = self.state(name)
            except OSError as e:  # status goes without it; the update sequence will say
                log.warning("update %s: cannot read its state: %s", name, e)
                continue
            offered = st.offered()
            if offered is not None:
                self.offered[name] = offered
            if st.last_rollback:
                self.last_rollback[name] = st.last_rollback
        if not self.engine.config.update.identity:  # else nothing to write on a store
            self._fallback = resolve("", self.updates_dir())
        me = self.identity()
        assert me is not None
        log.info("update identity %s (from %s)", me.value, me.source)

    def identity(self) -> Identity | None:
        """This daemon's identity in the fleet (identity.py): update.identity as it is now
        (a reload may change it), else the one resolved at start (None before `load`)."""
        configured = self.engine.config.update.identity
        return Identity(configured, "update.identity") if configured else self._fallback

    async def identity_now(self) -> Identity:
        """`identity`, resolving it (in a thread) if `load` has not yet."""
        if self.identity() is None:
            self._fallback = await asyncio.to_thread(resolve, "", self.updates_dir())
        me = self.identity()
        assert me is not None
        return me

    def updates_dir(self) -> Path:
        return self.engine.store.root / "updates"

    def workdir(self, name: str) -> Path:
        return self.updates_dir() / name

    def state_path(self, name: str) -> Path:
        return self.workdir(name) / "state.json"

    def state(self, name: str) -> State:
        return State.load(self.state_path(name))

    def public_key(self, m: ModelConfig) -> Ed25519PublicKey:
        text = m.update_key.strip()
        if not text.startswith("ed25519:"):
            try:
                text = Path(text).expanduser().read_text().strip()
            except OSError as e:
                raise FailedPrecondition(
                    f"models.{m.name}.update_key: cannot read key file {m.update_key}: {e}"
                ) from None
        try:
            return parse_public_key(text)
        except ValueError as e:
            raise FailedPrecondition(f"models.{m.name}.update_key: {e}") from None

    # ---------------------------------------------------------------- the job in flight

    def control(self, name: str, size: int, *, in_job: bool = True) -> fetch.Control:
        """A deadline and rate floor for one download of `size` bytes; `in_job`: made the
        current one of the model's apply (so `abandon` and status reach it)."""
        cfg = self.engine.config.update
        deadline = cfg.fetch_deadline_seconds or 60 + size / cfg.fetch_min_bytes_per_second
        control = fetch.Control(deadline, cfg.fetch_min_bytes_per_second)
        return self.adopt(name, control) if in_job else control

    def adopt(self, name: str, control: fetch.Control) -> fetch.Control:
        job = self.jobs.get(name)
        if job is not None:
            if job.control.aborted is not None:  # abandoned between two steps
                control.cancel(job.control.aborted.kind, str(job.control.aborted))
            job.control = control
        return control

    def stage(self, name: str, stage: str) -> None:
        job = self.jobs.get(name)
        if job is not None:
            job.stage = stage

    # ---------------------------------------------------------------- what happened

    def record(self, name: str, text: str, level: int = logging.INFO) -> None:
        self.last[name] = text
        log.log(level, "update %s: %s", name, text)
        path = self.state_path(name)
        st = State.load(path)
        st.last = text
        st.save(path)

    def reject(self, name: str, reason: str, message: str) -> None:
        self.metrics.update_rejections.labels(name, reason).inc()
        self.record(name, f"rejected ({reason}): {message}", level=logging.ERROR)

    def aborted(self, name: str, e: fetch.Aborted) -> SidecarError:
        self.metrics.update_rejections.labels(name, e.kind).inc()
        self.record(name, f"stopped ({e.kind}): {e}", level=logging.WARNING)
        if e.kind == "cancelled":
            return Cancelled(f"update of {name!r} {e}")
        return Unavailable(f"update of {name!r} stopped: {e}")

    def fail(self, name: str, sha: str, reason: str, message: str) -> None:
        """Remember that the file with `sha` failed (it is not tried again) and why."""
        path = self.state_path(name)
        st = State.load(path)
        st.failed[sha] = message
        st.pending, st.pending_override = "", False
        st.save(path)
        self.clean(name, keep={"state.json"})
        self.reject(name, reason, message)

    def fail_refused(self, name: str, sha: str, e: SwapRefused) -> None:
        """`fail` for a candidate its swap (a model's or an adapter's) refused: the reason
        says at which stage (a header check, the eval gate; the rest is its canary)."""
        reason = {"validating": "validation", "eval": "eval"}.get(e.stage, "canary")
        self.fail(name, sha, reason, e.message)

    def clean(self, name: str, keep: set[str]) -> None:
        d = self.workdir(name)
        for p in d.glob("*") if d.exists() else []:
            if p.name not in keep:
                p.unlink(missing_ok=True)
