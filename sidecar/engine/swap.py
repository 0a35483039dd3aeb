"""Hot swap: replace the model behind a name with zero failed requests.

The one sequence to get right (ARCHITECTURE.md), all of it here:
0. resolve what to swap to: a stored version (its bytes re-verified) or a new file (added
   to the store, which checks its hash); either is held in the store until it serves,
1. validate the file (GGUF structure, and for side-by-side, the memory it needs),
2. start new workers on it and prove them with a canary,
3. flip: new requests go to the new workers; running ones finish on the old,
4. drain the old workers (bounded), then stop them; the store's active pointer moves.
Before step 1 the model's active LoRA adapters are checked against the new file's header
(`AdapterTable.misfits`); the swap proceeds either way (a new file is how a model is
upgraded), and at the flip the ones that do not fit are marked, so that requests for them
fail fast with the reason; the result lists them.
Any failure before step 3 leaves the old model serving, raises `SwapRefused`, records the
reason (`last_swap`, shown by `sidecar status`) and quarantines the file.

Two strategies: "side_by_side" (default; needs memory for both models at once, checked
first) and "replace" (drain, stop, then load: new requests wait in the queue up to
`swap_wait_seconds`, then get UNAVAILABLE with retry advice; if the new model fails,
the old one is started again).

A pool is driven through its public methods only (see `pool`); one swap per model at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from pathlib import Path

import psutil

from sidecar.config import ModelConfig, StoreConfig, TaskConfig
from sidecar.domain.errors import (
    FailedPrecondition,
    InvalidRequest,
    SidecarError,
    SwapRefused,
)
from sidecar.domain.progress import Progress, ignore
from sidecar.domain.specs import RunnerSpec, declared_head_widths, kv_bytes, kv_cache_type
from sidecar.domain.status import SwapResult
from sidecar.domain.types import GenerateTask, Generation, ModelRef
from sidecar.engine.adapters import AdapterTable
from sidecar.engine.gate import Gate, load_golden
from sidecar.engine.mappings import open_files
from sidecar.engine.pool import VERSION_CHARS, ModelPool
from sidecar.engine.slots import Slot
from sidecar.gguf_check import GGUFError, GGUFInfo, check
from sidecar.store import ModelStore
from sidecar.store.images import PREFIX

STRATEGIES = ("side_by_side", "replace")
CANARY_TIMEOUT_S = 120.0  # a worker that cannot answer one short prompt in this is not fit
MiB = 1024 * 1024
_ROOT = Path("/")
_MEMFD = "memfd:" + PREFIX  # how /proc names a sealed blob's decrypted copy


class Swapper:
    """Swaps the models of a set of pools, one swap per model at a time, with the store
    as the source of files; remembers how each model's last swap ended."""

    def __init__(
        self,
        pools: Mapping[str, ModelPool],
        store: ModelStore,
        settings: Callable[[], StoreConfig],
        tasks: Callable[[], tuple[TaskConfig, ...]] = tuple,
        adapters: AdapterTable | None = None,
    ) -> None:
        self.pools = pools
        self.store = store
        self.adapters = adapters  # the models' LoRA adapters, checked against a new file
        self._settings = settings  # read per swap: a SIGHUP may change store.*
        self._tasks = tasks  # the same: a golden set may change on reload
        self._locks = {name: asyncio.Lock() for name in pools}
        self._last: dict[str, str] = {}

    def busy(self, name: str) -> bool:
        """A swap of `name` is under way."""
        return self._locks[name].locked()

    def last_swap(self, name: str) -> str:
        """How the last swap of `name` ended ("" = none since start), for status."""
        return self._last.get(name, "")

    async def swap(
        self,
        pool: ModelPool,
        *,
        version: str = "",
        path: Path | None = None,
        strategy: str = "",
        progress: Progress = ignore,
        move_source: bool = False,
        gate: bool = True,
    ) -> SwapResult:
        """Swap `pool` to a stored version or a new file. Refused swaps quarantine the file.
        `gate` False skips the eval gate (probation's swap back to the version it replaced)."""
        name = pool.config.name
        settings = self._settings()
        strategy = strategy or settings.swap_strategy
        if strategy not in STRATEGIES:
            raise InvalidRequest(
                f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}"
            )
        if self.busy(name):
            raise FailedPrecondition(
                f"a swap of {pool.ref.name!r} is in progress: wait for it to finish"
            )
        async with self._locks[name]:
            # Before the file is added: an unreadable golden set blames no candidate.
            checker = await self._gate(pool) if gate else None
            # Held from here until the pointers name it: no gc between add and load.
            sha = await self._resolve(pool, version, path, progress, move_source)
            held = True
            try:
                if sha[:VERSION_CHARS] == pool.ref.version:
                    progress("done", f"{pool.ref.name} already serves {pool.ref.version}")
                    return SwapResult(pool.ref, pool.ref, strategy, 0.0)
                misfits: dict[str, str] = {}  # filled at the flip
                try:
                    result = await switch(
                        pool,
                        self.store.blob(sha),
                        sha,
                        strategy,
                        progress,
                        settings.drain_seconds,
                        settings.swap_wait_seconds,
                        checker,
                        self.store.gguf,
                        functools.partial(self._flipping, pool, sha, progress, misfits),
                    )
                except SwapRefused as e:
                    self.store.release(sha)
                    held = False
                    in_use = self.in_use()
                    where = await asyncio.to_thread(self._refuse, name, sha, e.reason, in_use)
                    self._last[name] = (
                        f"refused {sha[:VERSION_CHARS]} at {e.stage}: {e.reason} "
                        f"(quarantined as {where.name})"
                    )
                    progress("failed", self._last[name])
                    raise
                await asyncio.to_thread(self.store.activate, name, sha)
            finally:
                if held:
                    self.store.release(sha)
            not_fitting = tuple(f"{a}: {why}" for a, why in sorted(misfits.items()))
            result = replace(result, adapters_not_fitting=not_fitting)
            self._last[name] = (
                f"{result.old.version} -> {result.new.version} "
                f"({result.strategy}, {result.seconds:.1f}s)"
            ) + result.misfit_note()
            return result

    def _adapter_lock(self, name: str) -> asyncio.Lock:
        return self.adapters.lock(name) if self.adapters is not None else asyncio.Lock()

    async def _misfits(self, pool: ModelPool, sha: str, progress: Progress) -> dict[str, str]:
        """The model's active adapters that do not fit version `sha` -> why."""
        if self.adapters is None or not self.adapters.names(pool.config.name):
            return {}
        progress("adapters", "checking the model's adapters against the new file")
        found = await asyncio.to_thread(
            self.adapters.misfits, pool.config.name, self.store.blob(sha)
        )
        for adapter, why in sorted(found.items()):
            progress("adapters", f"adapter {adapter!r} does not fit the new file: {why}")
        return found

    @contextlib.asynccontextmanager
    async def _flipping(
        self, pool: ModelPool, sha: str, progress: Progress, misfits: dict[str, str]
    ) -> AsyncIterator[None]:
        """Around the flip: the model's adapters are checked against the new file and
        marked, and the pool routes to it, with no adapter activated in between (an
        activation re-checks under the same lock against the file served after it). Held
        for header reads only: never across a load, a canary or a drain, which an
        activation's own canary may wait behind."""
        name = pool.config.name
        async with self._adapter_lock(name):
            misfits.update(await self._misfits(pool, sha, progress))
            table = self.adapters
            if table is not None:
                table.mark(name, misfits, sha[:VERSION_CHARS])
                if misfits:  # queued before the mark: failed as one submitted after it
                    pool.fail_queued(lambda job: table.stranded(name, job.task))
            yield

    async def _gate(self, pool: ModelPool) -> Gate | None:
        """The eval gate of `pool`'s model, its golden set read now; None without one."""
        task_name = pool.config.eval
        if not task_name:
            return None
        task = next((t for t in self._tasks() if t.name == task_name), None)
        if task is None:  # the loader refuses this; a reload could not have made it
            raise FailedPrecondition(f"models.{pool.config.name}.eval names no task {task_name!r}")
        golden = await asyncio.to_thread(load_golden, task)
        return Gate(self.store.root, pool.config, golden)

    async def _resolve(
        self,
        pool: ModelPool,
        version: str,
        path: Path | None,
        progress: Progress,
        move_source: bool,
    ) -> str:
        """The sha256 to swap to, held in the store (the caller releases it)."""
        name = pool.config.name
        if path is not None:
            progress("adding", f"{path} to the store")
            try:
                return await asyncio.to_thread(
                    functools.partial(self.store.add, path, name, hold=True)
                )
            except GGUFError as e:
                where = await asyncio.to_thread(
                    self.store.quarantine, path, e.message, move=move_source
                )
                self._last[name] = f"refused {path.name}: {e.message} (quarantined as {where.name})"
                progress("failed", self._last[name])
                raise SwapRefused("validating", e.message) from None
        if not version:
            raise InvalidRequest("name a version (NAME@VERSION) or a file to swap to")
        sha = self.store.resolve(name, version)
        self.store.hold(sha)
        try:
            # Stored, but loaded again now: make sure its bytes are still the ones hashed.
            progress("verifying", f"{sha[:VERSION_CHARS]} in the store")
            await asyncio.to_thread(self.store.verify, sha)
        except BaseException:
            self.store.release(sha)
            raise
        return sha

    def _refuse(self, name: str, sha: str, reason: str, in_use: dict[str, str]) -> Path:
        where = self.store.quarantine(self.store.blob(sha), reason, move=False)
        with contextlib.suppress(SidecarError):
            self.store.remove(name, sha, in_use)
        return where

    def in_use(self) -> dict[str, str]:
        """sha256 of every store blob a live worker maps or has open (draining ones
        included) -> which worker: read from /proc where it can be, else the file the
        worker was started on. Call it on the event loop: it reads the pools."""
        blobs = self.store.blobs.resolve()
        found: dict[str, str] = {}
        for name, pool in self.pools.items():
            for slot in pool.workers():
                pid, state = slot.info.pid, slot.info.state
                if state in ("dead", "stopped"):
                    continue
                files = open_files(pid) if pid is not None else None
                if files is None or state == "starting":  # not yet open: its spec says
                    files = (files or set()) | {slot.spec.path.resolve()}
                for f in files:
                    if f.parent == _ROOT and f.name.startswith(_MEMFD):  # a decrypted copy
                        f = blobs / f"{f.name.removeprefix(_MEMFD)}.gguf"
                    if f.parent == blobs and f.suffix == ".gguf":
                        who = f"worker pid {pid} of model {name!r}" if pid else f"model {name!r}"
                        found.setdefault(f.stem, who)
        return found


def _meta_int(info: GGUFInfo, key: str, default: int = 0) -> int:
    value = info.metadata.get(f"{info.architecture}.{key}", default)
    return int(value) if isinstance(value, int | float) else default


def head_widths(info: GGUFInfo) -> tuple[int, int]:
    return declared_head_widths(info.metadata, info.architecture)


def footprint(info: GGUFInfo, context: int, workers: int, kv_cache: str = "f16") -> int:
    """Bytes the new model needs: weights once (shared mmap) + KV cache per worker;
    `context`: KV cells per worker (`RunnerSpec.kv_cells`: every sequence slot's window);
    `kv_cache`: the configured type ("auto" resolved for this file as the worker will)."""
    heads = _meta_int(info, "attention.head_count", 1) or 1
    kv_heads = _meta_int(info, "attention.head_count_kv", heads) or heads
    widths = head_widths(info)
    kind = kv_cache_type(kv_cache, widths)
    per_cell = _meta_int(info, "block_count") * kv_heads * sum(widths) * kv_bytes(kind)
    return info.file_size + int(context * per_cell) * workers


def check_canary(config: ModelConfig, event: object, ms: float) -> str | None:
    """None if the canary reply has the configured properties, else what was wrong."""
    if isinstance(event, SidecarError):
        return f"canary request failed: {event.message}"
    if not isinstance(event, Generation):
        return "canary returned no generation"
    if config.canary_max_ms and ms > config.canary_max_ms:
        return f"canary took {ms:.0f} ms, over models.{config.name}.canary_max_ms={config.canary_max_ms}"
    if config.canary_expect and not re.search(config.canary_expect, event.text):
        return f"canary reply {event.text[:80]!r} does not match {config.canary_expect!r}"
    if not config.canary_expect and event.usage.completion_tokens < 1:
        return "canary produced no token"
    return None


async def switch(
    pool: ModelPool,
    path: Path,
    version: str,
    strategy: str,
    progress: Progress,
    drain_s: float,
    wait_s: float,
    gate: Gate | None = None,
    inspect: Callable[[Path], GGUFInfo] = check,
    on_flip: Callable[[], contextlib.AbstractAsyncContextManager[None]] = contextlib.nullcontext,
) -> SwapResult:
    """Steps 1 to 4 for a file already in the store: validate, prove (canary, then the eval
    gate), flip, drain. `inspect`: reads the file's GGUF header (the store's, through
    decryption, for a sealed blob); `on_flip`: entered at the flip, new requests going to the
    new workers inside it."""
    started = time.monotonic()
    old_ref = pool.ref
    new_ref = ModelRef(pool.config.name, version[:VERSION_CHARS])
    progress("validating", str(path))
    try:
        info = await asyncio.to_thread(inspect, path)
    except SidecarError as e:
        raise SwapRefused("validating", e.message) from None
    need = footprint(info, pool.spec.kv_cells, pool.config.workers, pool.spec.kv_cache)
    available = psutil.virtual_memory().available
    progress("memory", f"needs ~{need // MiB} MiB, {available // MiB} MiB available")
    if strategy == "side_by_side" and need > available:
        raise SwapRefused(
            "memory",
            f"the new model needs ~{need // MiB} MiB beside the running one but only "
            f"{available // MiB} MiB is available: retry with strategy 'replace'",
        )
    spec = replace(pool.spec, path=path)
    if gate is not None:  # while the serving version still has its workers (replace too)
        await gate.prepare(pool, progress)
    if strategy == "replace":
        await _replace_in_place(pool, spec, new_ref, progress, drain_s, wait_s, gate, on_flip)
    else:
        slots = await _prove(pool, spec, progress, gate)
        progress("flipping", f"{old_ref.version} -> {new_ref.version}")
        async with on_flip():
            old = pool.route_to(slots, new_ref, spec)
        progress("draining", f"{len(old)} old worker(s), up to {drain_s:.0f}s")
        await pool.drain(old, drain_s)
    seconds = time.monotonic() - started
    progress("done", f"{pool.config.name} now serves {new_ref.version} ({seconds:.1f}s)")
    return SwapResult(old_ref, new_ref, strategy, seconds)


async def _prove(
    pool: ModelPool, spec: RunnerSpec, progress: Progress, gate: Gate | None = None
) -> list[Slot]:
    """Start the new workers, run the canary on each, then the eval gate on all of them;
    stop them all on any failure."""
    progress("loading", f"{pool.config.workers} worker(s)")
    results = await asyncio.gather(
        *(pool.start_slot(spec) for _ in range(pool.config.workers)), return_exceptions=True
    )
    slots = [r for r in results if not isinstance(r, BaseException)]
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is not None:
        await _stop_all(slots)
        message = failure.message if isinstance(failure, SidecarError) else repr(failure)
        raise SwapRefused("loading", message)
    progress("canary", pool.config.canary_prompt or "one-token generation")
    task = GenerateTask(
        pool.config.canary_prompt or "Hello", None if pool.config.canary_prompt else 1
    )
    for slot in slots:
        t0 = time.monotonic()
        try:
            event = await asyncio.wait_for(pool.run_on(slot, task), CANARY_TIMEOUT_S)
        except TimeoutError:
            await _stop_all(slots)
            raise SwapRefused("canary", f"no answer within {CANARY_TIMEOUT_S:.0f}s") from None
        problem = check_canary(pool.config, event, (time.monotonic() - t0) * 1000)
        if problem:
            await _stop_all(slots)
            raise SwapRefused("canary", problem)
    if gate is not None:
        try:
            await gate.check(pool, slots, spec.path.stem, progress)
        except BaseException:
            await _stop_all(slots)
            raise
    return slots


async def _replace_in_place(
    pool: ModelPool,
    spec: RunnerSpec,
    new_ref: ModelRef,
    progress: Progress,
    drain_s: float,
    wait_s: float,
    gate: Gate | None,
    on_flip: Callable[[], contextlib.AbstractAsyncContextManager[None]],
) -> None:
    progress("pausing", f"new requests wait up to {wait_s:.0f}s")
    pool.pause(wait_s)
    try:
        old_spec = pool.spec
        old = pool.route_to([], pool.ref, old_spec)  # no worker: new requests wait
        progress("draining", f"{len(old)} worker(s), up to {drain_s:.0f}s")
        await pool.drain(old, drain_s)
        try:
            slots = await _prove(pool, spec, progress, gate)
        except SwapRefused:
            progress("rolling back", "restarting the previous model")
            back = await _prove(pool, old_spec, progress)
            pool.route_to(back, pool.ref, old_spec)
            raise
        progress("flipping", f"-> {new_ref.version}")
        async with on_flip():
            pool.route_to(slots, new_ref, spec)
    finally:
        pool.resume()


async def _stop_all(slots: list[Slot]) -> None:
    with contextlib.suppress(Exception):
        await asyncio.gather(*(s.stop() for s in slots), return_exceptions=True)
