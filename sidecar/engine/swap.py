"""Hot swap: replace the model behind a name with zero failed requests.

The one sequence to get right (ARCHITECTURE.md):
1. validate the file (GGUF structure; the engine had the store re-verify its hash),
2. start new workers on it and prove them with a canary,
3. flip: new requests go to the new workers; running ones finish on the old,
4. drain the old workers (bounded), then stop them.
Any failure before step 3 leaves the old model serving and raises `SwapRefused`.

Two strategies: "side_by_side" (default; needs memory for both models at once, checked
first) and "replace" (drain, stop, then load: new requests wait in the queue up to
`swap_wait_seconds`, then get UNAVAILABLE with retry advice; if the new model fails,
the old one is started again).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import psutil

from sidecar.config import ModelConfig
from sidecar.domain.errors import SidecarError, SwapRefused
from sidecar.domain.specs import RunnerSpec
from sidecar.domain.status import SwapResult
from sidecar.domain.types import GenerateTask, Generation, ModelRef
from sidecar.engine.pool import ModelPool
from sidecar.engine.slots import Slot
from sidecar.gguf_check import GGUFInfo, check

STRATEGIES = ("side_by_side", "replace")
CANARY_TIMEOUT_S = 120.0  # a worker that cannot answer one short prompt in this is not fit
MiB = 1024 * 1024
Progress = Callable[[str, str], None]


def footprint(info: GGUFInfo, context: int, workers: int) -> int:
    """Bytes the new model needs: weights once (shared mmap) + f16 KV cache per worker."""
    arch = info.architecture
    meta = info.metadata

    def num(key: str, default: int = 0) -> int:
        value = meta.get(f"{arch}.{key}", default)
        return int(value) if isinstance(value, int | float) else default

    layers, embd = num("block_count"), num("embedding_length")
    heads = num("attention.head_count", 1) or 1
    kv_heads = num("attention.head_count_kv", heads) or heads
    kv = 2 * layers * context * (embd * kv_heads // heads) * 2
    return info.file_size + kv * workers


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


async def swap(
    pool: ModelPool,
    path: Path,
    version: str,
    strategy: str,
    progress: Progress,
    drain_s: float,
    wait_s: float,
) -> SwapResult:
    started = time.monotonic()
    old_ref = pool.ref
    new_ref = ModelRef(pool.config.name, version[:12])
    progress("validating", str(path))
    try:
        info = await asyncio.to_thread(check, path)
    except SidecarError as e:
        raise SwapRefused("validating", e.message) from None
    need = footprint(info, pool.config.context, pool.config.workers)
    available = psutil.virtual_memory().available
    progress("memory", f"needs ~{need // MiB} MiB, {available // MiB} MiB available")
    if strategy == "side_by_side" and need > available:
        raise SwapRefused(
            "memory",
            f"the new model needs ~{need // MiB} MiB beside the running one but only "
            f"{available // MiB} MiB is available: retry with strategy 'replace'",
        )
    spec = replace(pool.spec, path=path)
    if strategy == "replace":
        await _replace_in_place(pool, spec, new_ref, progress, drain_s, wait_s)
    else:
        slots = await _prove(pool, spec, progress)
        progress("flipping", f"{old_ref.version} -> {new_ref.version}")
        old = pool.flip(slots, new_ref, spec)
        progress("draining", f"{len(old)} old worker(s), up to {drain_s:.0f}s")
        await pool.drain(old, drain_s)
    seconds = time.monotonic() - started
    progress("done", f"{pool.config.name} now serves {new_ref.version} ({seconds:.1f}s)")
    return SwapResult(old_ref, new_ref, strategy, seconds)


async def _prove(pool: ModelPool, spec: RunnerSpec, progress: Progress) -> list[Slot]:
    """Start the new workers and run the canary on each; stop them all on any failure."""
    progress("loading", f"{pool.config.workers} worker(s)")
    slots = [pool._make_slot(spec, pool) for _ in range(pool.config.workers)]
    results = await asyncio.gather(*(s.start() for s in slots), return_exceptions=True)
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
    return slots


async def _replace_in_place(
    pool: ModelPool,
    spec: RunnerSpec,
    new_ref: ModelRef,
    progress: Progress,
    drain_s: float,
    wait_s: float,
) -> None:
    progress("pausing", f"new requests wait up to {wait_s:.0f}s")
    pool.paused = True
    expiry = asyncio.create_task(_expire(pool, wait_s))
    try:
        old_spec = pool.spec
        old = pool.flip([], pool.ref, old_spec)
        progress("draining", f"{len(old)} worker(s), up to {drain_s:.0f}s")
        await pool.drain(old, drain_s)
        try:
            slots = await _prove(pool, spec, progress)
        except SwapRefused:
            progress("rolling back", "restarting the previous model")
            back = await _prove(pool, old_spec, progress)
            pool.flip(back, pool.ref, old_spec)
            raise
        progress("flipping", f"-> {new_ref.version}")
        pool.flip(slots, new_ref, spec)
    finally:
        expiry.cancel()
        pool.paused = False
        pool._dispatch()


async def _expire(pool: ModelPool, wait_s: float) -> None:
    while True:
        pool.expire_waiting(wait_s)
        await asyncio.sleep(0.1)


async def _stop_all(slots: list[Slot]) -> None:
    with contextlib.suppress(Exception):
        await asyncio.gather(*(s.stop() for s in slots), return_exceptions=True)
