"""The daemon side of updates: check a model's origin, fetch, rebuild, install, swap, watch.

One sequence per model, never two at once:

1. Fetch `<origin>/<name>.manifest.json` (size-capped) and verify it (signature by the
   configured key, name, expiry, never older than a version already trusted).
2. Plan the cheapest download: a chain of deltas from any version the store holds, or
   the full file (`plan.cheapest`).
3. Fetch each piece into `<store>/updates/<name>/` as a `.partial` file. Downloads resume
   (HTTP Range) after a cut or a restart: the partial file is the only state they need.
4. Rebuild with bounded memory (`delta.apply_delta`), check the sha256 of every step
   against the manifest; a delta that fails is remembered and the full file is fetched
   instead, by itself.
5. Install: the verified file enters the store (validated as GGUF there) and the hot-swap
   path proves it (canary) before anyone is served by it.
6. Probation: if a worker of the new version dies or a readiness probe fails within
   `update.healthy_seconds`, the previous version is swapped back and the reason kept.

Every download has a total deadline and a rate floor (`update.fetch_*`), so a trickling
origin cannot hold the per-model lock forever; a caller of `apply` that goes away cancels
the job (`abandon`) unless it already reached install, and status shows a job in flight
(`fetching`). A cut download keeps its partial file: the next apply resumes it.

Partial files are never models: only `store.add` of a verified file makes one, and the
store's pointers are written atomically, so `kill -9` at any point leaves the serving
model intact and the next run resumes. State that must survive restarts (highest trusted
version, versions that failed, probation) lives in `state.json` beside the partials.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

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
from sidecar.store import write_atomic
from sidecar.update import delta, fetch
from sidecar.update.manifest import Manifest, UpdateRejected, parse_public_key, verify
from sidecar.update.plan import Plan, cheapest

log = logging.getLogger("sidecar.update")

MANIFEST_MAX_BYTES = 1 << 20
T = TypeVar("T")

# stage, detail, done bytes, total bytes
Progress = Callable[[str, str, int, int], None]


def _quiet(_stage: str, _detail: str, _done: int, _total: int) -> None:
    pass


def _size(path: Path) -> int:
    """Bytes a resumed download already has (a cheap stat, fine on the loop)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


async def _in_thread(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """Run blocking I/O in a daemon thread. Unlike asyncio.to_thread's pool, a daemon thread
    does not hold up the daemon's exit until a long download ends; what it leaves behind is
    a partial file that the next run resumes."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result = fn(*args, **kw)
        except BaseException as e:
            loop.call_soon_threadsafe(settle, None, e)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=work, name="sidecar-update", daemon=True).start()
    return await future


@dataclass
class _Job:
    """The one update of a model in flight: what status shows, what `abandon` stops."""

    owner: object = None  # whoever asked (an RPC); only they may abandon it
    stage: str = "checking"
    control: fetch.Control = field(default_factory=fetch.Control)
    cancellable: bool = True  # until install: half an install helps nobody
    started: float = field(default_factory=time.monotonic)

    def describe(self) -> str:
        c, now = self.control, time.monotonic()
        text = f"{self.stage} {c.what or ''}".rstrip()
        if c.total:
            text += f": {c.done} of {c.total} bytes"
        text += f", {now - self.started:.0f}s old"
        if self.stage in ("checking", "fetching"):
            text += f", last byte {now - c.last_byte:.0f}s ago"
            if c.deadline is not None:
                text += f", deadline in {max(c.deadline - now, 0):.0f}s"
        return text


@dataclass
class State:
    """What must survive a restart, per model."""

    highest_version: int = 0  # the newest version a verified manifest ever named
    installed_version: int = 0
    installed_sha256: str = ""
    failed: dict[str, str] = field(default_factory=dict)  # full-file sha256 -> why
    bad_deltas: list[str] = field(default_factory=list)  # delta sha256s that did not apply
    pending: str = ""  # target sha256 of an install in progress (resumed at start)
    probation: dict[str, Any] = field(default_factory=dict)
    last: str = ""

    @classmethod
    def load(cls, path: Path) -> State:
        try:
            raw = json.loads(path.read_text())
            return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})
        except FileNotFoundError:
            return cls()
        except (ValueError, TypeError) as e:
            # A damaged state file must not stop updates; what it guarded is re-learned.
            log.warning("update state %s unreadable (%s): starting afresh", path, e)
            return cls()

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(asdict(self), indent=1, sort_keys=True).encode())


@dataclass(frozen=True)
class Check:
    model: str
    manifest: Manifest
    installed_version: int
    plan: Plan | None  # None: nothing to do (see detail)
    detail: str


@dataclass(frozen=True)
class Outcome:
    model: str
    from_version: int
    to_version: int
    new_version: str
    plan: str
    fetched_bytes: int
    full_bytes: int
    installed: bool


class Updater:
    def __init__(
        self, engine: PoolEngine, metrics: Metrics, probe_errors: dict[str, str | None]
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self._probe_errors = probe_errors
        self._locks: dict[str, asyncio.Lock] = {}
        self._jobs: dict[str, _Job] = {}
        self.last: dict[str, str] = {}  # per model, for status
        # Worker restarts and probe error when probation began: later changes are trouble.
        self._probation_baseline: dict[str, tuple[int, str | None]] = {}

    # ---------------------------------------------------------------- plumbing

    def _model(self, name: str) -> ModelConfig:
        pool = self.engine.pool(name)
        m = self.engine.config.model(pool.config.name) or pool.config
        if not m.update_origin or not m.update_key:
            raise FailedPrecondition(
                f"model {m.name!r} has no update origin: set models.{m.name}.update_origin "
                f"and models.{m.name}.update_key"
            )
        return m

    def workdir(self, name: str) -> Path:
        return self.engine.store.root / "updates" / name

    def _state_path(self, name: str) -> Path:
        return self.workdir(name) / "state.json"

    def state(self, name: str) -> State:
        return State.load(self._state_path(name))

    def _key(self, m: ModelConfig) -> Ed25519PublicKey:
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

    def _control(self, name: str, size: int, *, in_job: bool = True) -> fetch.Control:
        """A deadline and rate floor for one download of `size` bytes; `in_job`: made the
        current one of the model's apply (so `abandon` and status reach it)."""
        cfg = self.engine.config.update
        deadline = cfg.fetch_deadline_seconds or 60 + size / cfg.fetch_min_bytes_per_second
        control = fetch.Control(deadline, cfg.fetch_min_bytes_per_second)
        return self._adopt(name, control) if in_job else control

    def _adopt(self, name: str, control: fetch.Control) -> fetch.Control:
        job = self._jobs.get(name)
        if job is not None:
            if job.control.aborted is not None:  # abandoned between two steps
                control.cancel(job.control.aborted.kind, str(job.control.aborted))
            job.control = control
        return control

    def _stage(self, name: str, stage: str) -> None:
        job = self._jobs.get(name)
        if job is not None:
            job.stage = stage

    def fetching(self, model: str) -> str:
        """The update in flight for status ('' when none): bytes, age, deadline."""
        job = self._jobs.get(model)
        return job.describe() if job is not None else ""

    def abandon(self, model: str, owner: object, why: str = "the caller went away") -> bool:
        """Stop the update `owner` started on `model` because nobody waits for it, unless
        it already reached install. Its partial files stay for the next apply."""
        try:
            name = self.engine.pool(model).config.name
        except SidecarError:
            return False
        job = self._jobs.get(name)
        if job is None or job.owner is not owner or not job.cancellable:
            return False
        log.info("update %s: cancelled while %s (%s)", name, job.stage, why)
        job.control.cancel("cancelled", f"cancelled while {job.stage}: {why}")
        return True

    def _reject(self, name: str, reason: str, message: str) -> None:
        self.metrics.update_rejections.labels(name, reason).inc()
        self._record(name, f"rejected ({reason}): {message}", level=logging.ERROR)

    def _record(self, name: str, text: str, level: int = logging.INFO) -> None:
        self.last[name] = text
        log.log(level, "update %s: %s", name, text)
        path = self._state_path(name)
        st = State.load(path)
        st.last = text
        st.save(path)

    # ---------------------------------------------------------------- check

    async def check(self, model: str, *, in_job: bool = False) -> Check:
        """`in_job`: part of an apply (a lone check must not take over its status)."""
        m = self._model(model)
        name = m.name
        timeout = self.engine.config.update.timeout_seconds
        url = fetch.origin_url(m.update_origin, f"{name}.manifest.json")
        control = self._control(name, MANIFEST_MAX_BYTES, in_job=in_job)
        try:
            data = await _in_thread(
                fetch.fetch_bytes,
                url,
                max_bytes=MANIFEST_MAX_BYTES,
                timeout=timeout,
                control=control,
            )
        except UpdateRejected as e:
            self._reject(name, e.reason, e.message)
            raise FailedPrecondition(f"update of {name!r} refused: {e.message}") from None
        except fetch.Aborted as e:
            raise self._aborted(name, e) from None
        except fetch.FetchError as e:
            self.metrics.update_rejections.labels(name, "fetch").inc()
            self._record(name, f"origin unreachable: {e}", level=logging.WARNING)
            raise Unavailable(f"update origin for {name!r}: {e}") from None
        st = self.state(name)
        try:
            # A re-read of the version we already trust is fine; anything older is a
            # rollback (or a replayed old manifest) and is refused.
            trusted = st.highest_version - 1 if st.highest_version else None
            manifest = verify(data, self._key(m), name=name, installed_version=trusted)
        except UpdateRejected as e:
            self._reject(name, e.reason, e.message)
            raise FailedPrecondition(f"update of {name!r} refused: {e.message}") from None
        if manifest.version > st.highest_version:
            st.highest_version = manifest.version
            st.save(self._state_path(name))
        current = self.engine.pool(name).ref.version  # sha256 prefix of what serves now
        installed = st.installed_version if st.installed_sha256.startswith(current) else 0
        installed = installed or next(
            (v for v, sha in manifest.versions.items() if sha.startswith(current)), 0
        )
        if manifest.sha256.startswith(current):
            return Check(name, manifest, installed, None, f"up to date (v{manifest.version})")
        if manifest.sha256 in st.failed:
            why = st.failed[manifest.sha256]
            return Check(
                name, manifest, installed, None, f"v{manifest.version} failed before: {why}"
            )
        held = await asyncio.to_thread(self._held, name)
        plan = cheapest(manifest, held, avoid=frozenset(st.bad_deltas))
        return Check(name, manifest, installed, plan, plan.describe())

    def _held(self, name: str) -> set[str]:
        """Full-file hashes a delta may start from: every stored version of any model."""
        store = self.engine.store
        return {sha for n in store.names() for sha in store.versions(n)}

    # ---------------------------------------------------------------- apply

    async def apply(self, model: str, progress: Progress = _quiet, owner: object = None) -> Outcome:
        name = self.engine.pool(model).config.name
        lock = self._locks.setdefault(name, asyncio.Lock())
        if lock.locked():
            job = self._jobs.get(name)
            now = f" ({job.describe()})" if job is not None else ""
            raise FailedPrecondition(f"an update of {name!r} is already running{now}")
        async with lock:
            self._jobs[name] = _Job(owner)
            try:
                return await self._apply(name, progress)
            finally:
                self._jobs.pop(name, None)

    def _aborted(self, name: str, e: fetch.Aborted) -> SidecarError:
        self.metrics.update_rejections.labels(name, e.kind).inc()
        self._record(name, f"stopped ({e.kind}): {e}", level=logging.WARNING)
        if e.kind == "cancelled":
            return Cancelled(f"update of {name!r} {e}")
        return Unavailable(f"update of {name!r} stopped: {e}")

    async def _apply(self, name: str, progress: Progress) -> Outcome:
        progress("checking", f"reading the manifest of {name}", 0, 0)
        check = await self.check(name, in_job=True)
        manifest, plan = check.manifest, check.plan
        current = self.engine.pool(name).ref.version
        if plan is None:
            self._record(name, check.detail)
            return Outcome(name, check.installed_version, check.installed_version, current,
                           check.detail, 0, manifest.size, False)  # fmt: skip
        path = self._state_path(name)
        st = self.state(name)
        st.pending = manifest.sha256
        st.save(path)
        fetched = 0
        try:
            file, fetched, how = await self._obtain(name, manifest, plan, progress)
            job = self._jobs.get(name)
            if job is not None:
                job.control.check()  # abandoned in the last moment before install
                job.cancellable = False
            self._stage(name, "installing")
            progress("installing", f"adding v{manifest.version} to the store", 0, 0)
            # Held until the swap has run, so a `gc` in between cannot take it.
            store = self.engine.store
            if file == store.blob(manifest.sha256):  # stored already: no copy of a big file
                add = functools.partial(store.adopt, name, manifest.sha256, hold=True)
            else:
                add = functools.partial(
                    store.add, file, name, expect_sha256=manifest.sha256, hold=True
                )
            sha = await asyncio.to_thread(add)
            if file.parent == self.workdir(name):  # never a store blob we started from
                file.unlink(missing_ok=True)
        except UpdateRejected as e:
            self._reject(name, e.reason, e.message)
            raise FailedPrecondition(f"update of {name!r} refused: {e.message}") from None
        except fetch.Aborted as e:
            raise self._aborted(name, e) from None
        except fetch.FetchError as e:
            self.metrics.update_rejections.labels(name, "fetch").inc()
            self._record(name, f"download failed (will resume): {e}", level=logging.WARNING)
            raise Unavailable(
                f"update of {name!r}: download failed, it resumes next time: {e}"
            ) from None
        except SidecarError as e:  # the store refused the file (not a valid GGUF)
            self._fail(name, manifest.sha256, "validation", e.message)
            raise FailedPrecondition(f"update of {name!r} refused: {e.message}") from None
        previous = self.engine.pool(name).ref.version
        self._stage(name, "swapping")
        progress("swapping", f"proving v{manifest.version} before it serves", 0, 0)
        try:
            await self.engine.swap(
                name, version=sha, progress=lambda stage, detail: progress(stage, detail, 0, 0)
            )
        except SwapRefused as e:
            self._fail(
                name,
                manifest.sha256,
                "canary" if e.stage != "validating" else "validation",
                e.message,
            )
            raise
        finally:
            self.engine.store.release(sha)
        st = self.state(name)
        st.pending = ""
        st.installed_version, st.installed_sha256 = manifest.version, sha
        st.probation = {
            "sha256": sha,
            "version": manifest.version,
            "previous": previous,
            "previous_version": check.installed_version,
            "until": time.time() + self.engine.config.update.healthy_seconds,
        }
        st.save(path)
        self._probation_baseline[name] = self._health_marks(name)
        self.metrics.updates.labels(name, "delta" if how.startswith("delta") else "full").inc()
        self._clean(name, keep={"state.json"})
        summary = (
            f"installed v{manifest.version} ({sha[:12]}) via {how}; "
            f"fetched {fetched} bytes of {manifest.size}"
        )
        self._record(name, summary)
        progress("probation", f"v{manifest.version} serves; watching it for "
                 f"{self.engine.config.update.healthy_seconds:.0f}s", 0, 0)  # fmt: skip
        return Outcome(name, check.installed_version, manifest.version, sha[:12],
                       how, fetched, manifest.size, True)  # fmt: skip

    def _fail(self, name: str, sha: str, reason: str, message: str) -> None:
        path = self._state_path(name)
        st = State.load(path)
        st.failed[sha] = message
        st.pending = ""
        st.save(path)
        self._clean(name, keep={"state.json"})
        self._reject(name, reason, message)

    def _clean(self, name: str, keep: set[str]) -> None:
        d = self.workdir(name)
        for p in d.glob("*") if d.exists() else []:
            if p.name not in keep:
                p.unlink(missing_ok=True)

    async def _obtain(
        self, name: str, manifest: Manifest, plan: Plan, progress: Progress
    ) -> tuple[Path, int, str]:
        """A verified file with the manifest's hash, by the plan; a failing delta falls
        back to the full file. Returns the file, the bytes downloaded and how it came."""
        d = self.workdir(name)
        d.mkdir(parents=True, exist_ok=True)
        if not plan.full and not plan.steps:  # the store holds it already
            return self.engine.store.blob(plan.target_sha256), 0, "the store (no download)"
        fetched, how = 0, plan.describe()
        if not plan.full:
            try:
                file, fetched = await self._rebuild(name, manifest, plan, progress)
                return file, fetched, how
            except delta.DeltaError as e:
                log.warning("update %s: delta failed (%s); fetching the full file", name, e)
                progress("fetching", f"the delta failed ({e}); fetching the full file", 0, 0)
                how = f"full file ({manifest.size} bytes) after the delta failed: {e}"
        partial = d / f"{manifest.sha256}.full.partial"
        fetched += await self._fetch(name, manifest.full.path, partial, manifest.full.size,
                                     manifest.full.sha256, progress)  # fmt: skip
        return partial, fetched, how

    async def _fetch(
        self, name: str, rel: str, partial: Path, size: int, sha: str, progress: Progress
    ) -> int:
        m = self._model(name)
        cfg = self.engine.config.update
        before = _size(partial)
        loop = asyncio.get_running_loop()
        self._stage(name, "fetching")
        control = self._control(name, max(size - before, 0))

        def report(done: int, total: int) -> None:
            loop.call_soon_threadsafe(progress, "fetching", rel, done, total)

        await _in_thread(
            fetch.fetch_file,
            fetch.origin_url(m.update_origin, rel),
            partial,
            size=size,
            sha256=sha,
            timeout=cfg.timeout_seconds,
            retries=cfg.retries,
            progress=report,
            control=control,
        )
        got = max(size - before, 0)
        self.metrics.update_bytes.labels(name).inc(got)
        return got

    async def _rebuild(
        self, name: str, manifest: Manifest, plan: Plan, progress: Progress
    ) -> tuple[Path, int]:
        d = self.workdir(name)
        st = self.state(name)
        base = self.engine.store.blob(plan.steps[0].from_sha256)
        fetched = 0
        loop = asyncio.get_running_loop()
        for step in plan.steps:
            dpart = d / f"{step.sha256}.delta.partial"
            done = d / f"{step.sha256}.delta"
            if not done.exists():
                fetched += await self._fetch(
                    name, step.path, dpart, step.size, step.sha256, progress
                )
                os.replace(dpart, done)
            out = d / f"{step.to_sha256}.rebuilt.partial"
            self._stage(name, "rebuilding")
            control = self._adopt(name, fetch.Control())  # local work: no deadline
            control.what = f"v{step.to_version}"

            def report(
                written: int, total: int, v: int = step.to_version, c: fetch.Control = control
            ) -> None:
                c.progress(written, total)
                c.check()  # abandoned: stop between two ops
                loop.call_soon_threadsafe(progress, "rebuilding", f"v{v}", written, total)

            # The sizes come from the signed manifest, never from the delta: the last step
            # must make exactly the manifest's file; a step between two versions the
            # manifest gives no size for gets a generous cap derived from it.
            if step.to_sha256 == manifest.sha256:
                caps: dict[str, int] = {"target_size": manifest.size}
            else:
                caps = {"max_size": 2 * max(manifest.size, _size(base)) + delta.PIECE}
            try:
                info = await asyncio.to_thread(delta.read_delta_info, done)
                if (info.base_sha256, info.target_sha256) != (step.from_sha256, step.to_sha256):
                    raise delta.DeltaError(
                        f"the delta turns {info.base_sha256[:12]} into "
                        f"{info.target_sha256[:12]}; the manifest lists it for "
                        f"{step.from_sha256[:12]} -> {step.to_sha256[:12]}"
                    )
                got = await _in_thread(delta.apply_delta, base, done, out, progress=report, **caps)
                if got != step.to_sha256:
                    raise delta.DeltaError(
                        f"rebuilt v{step.to_version} has sha256 {got[:12]}, the manifest says "
                        f"{step.to_sha256[:12]}"
                    )
            except delta.DeltaError:
                st.bad_deltas.append(step.sha256)
                st.save(self._state_path(name))
                out.unlink(missing_ok=True)
                done.unlink(missing_ok=True)
                raise
            if base.parent == d:
                base.unlink(missing_ok=True)  # an intermediate step's output
            base = out
        return base, fetched

    # ---------------------------------------------------------------- probation

    def _health_marks(self, name: str) -> tuple[int, str | None]:
        return self.engine.pool(name).status().restarts, self._probe_errors.get(name)

    async def watch(self) -> None:
        """One probation pass over every model (the supervisor-like loop calls it)."""
        for name in list(self.engine.pools):
            path = self._state_path(name)
            if not path.exists():
                continue
            st = State.load(path)
            p = st.probation
            if not p:
                continue
            if not self.engine.pool(name).ref.version or not p["sha256"].startswith(
                self.engine.pool(name).ref.version
            ):
                st.probation = {}
                st.save(path)
                continue
            baseline = self._probation_baseline.setdefault(name, self._health_marks(name))
            restarts, probe_error = self._health_marks(name)
            trouble = ""
            if restarts > baseline[0]:
                trouble = f"{restarts - baseline[0]} worker restart(s)"
            elif probe_error and probe_error != baseline[1]:
                trouble = f"readiness probe failed: {probe_error}"
            if trouble:
                await self._roll_back(name, st, trouble)
            elif time.time() >= p["until"]:
                st.probation = {}
                st.save(path)
                self._probation_baseline.pop(name, None)
                self._record(name, f"v{p['version']} served healthily for the probation period")

    async def _roll_back(self, name: str, st: State, trouble: str) -> None:
        p = st.probation
        why = f"unhealthy within {self.engine.config.update.healthy_seconds:.0f}s: {trouble}"
        log.error("update %s: v%s %s; rolling back to %s", name, p["version"], why, p["previous"])
        try:
            await self.engine.swap(name, version=p["previous"])
        except SidecarError as e:
            self._record(name, f"rollback to {p['previous']} failed: {e.message}", logging.ERROR)
            return
        st = self.state(name)
        st.probation = {}
        st.failed[p["sha256"]] = why
        st.installed_version = int(p.get("previous_version") or 0)
        st.installed_sha256 = ""
        st.save(self._state_path(name))
        self._probation_baseline.pop(name, None)
        self._reject(name, "unhealthy", f"v{p['version']} rolled back to {p['previous']}: {why}")

    # ---------------------------------------------------------------- loop

    async def run(self, stop: asyncio.Event, tick: float = 1.0) -> None:
        """Probation watch every tick; automatic checks every update.interval_seconds; an
        install that a crash interrupted is resumed at once."""
        next_check: dict[str, float] = {}
        for name in self.engine.pools:
            if self.state(name).pending:
                next_check[name] = 0.0
        while not stop.is_set():
            try:
                await self.watch()
            except Exception:  # a bug here must not end the loop, nor pass unseen
                log.exception("update probation check failed")
            now = time.monotonic()
            interval = self.engine.config.update.interval_seconds
            for name in self.engine.pools:
                m = self.engine.config.model(name)
                if m is None or not m.update_origin or not m.update_key:
                    continue
                due = next_check.setdefault(name, now + interval if interval else float("inf"))
                if now < due:
                    continue
                next_check[name] = now + interval if interval else float("inf")
                try:
                    await self.apply(name)
                except SidecarError as e:
                    log.warning("update %s: %s", name, e.message)
                except Exception:
                    log.exception("update %s failed", name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), tick)
