"""The pool with workers that take several jobs at once (fake slots playing batching workers):
dispatch fills free sequence slots, least loaded worker first; a death with several jobs
running fails them all for a retry and blames none."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from sidecar.config import ModelConfig
from sidecar.domain.errors import WorkerCrashed
from sidecar.domain.types import GenerateTask
from sidecar.engine.fake import FakeSlot
from sidecar.engine.pool import ModelPool

pytestmark = pytest.mark.asyncio


class BatchingFake(FakeSlot):
    capacity = 3
    token_delay_s = 0.01


async def make_pool(tmp_path: Path, workers: int) -> ModelPool:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    config = replace(ModelConfig(name="m", path=model), workers=workers, parallel=3)
    pool = ModelPool(config, BatchingFake, default_max_tokens=8)
    await pool.start("0" * 64)
    return pool


async def test_jobs_fill_every_sequence_slot_least_loaded_worker_first(tmp_path: Path) -> None:
    pool = await make_pool(tmp_path, workers=2)
    try:
        assert pool.spec.parallel == 3
        jobs = [pool.submit(GenerateTask("a b", 20), f"c{i}", False) for i in range(7)]
        loads = sorted(len(s.job_ids) for s in pool.workers())
        assert loads == [3, 3]  # six run at once, spread evenly; the seventh waits
        assert pool.status().queue_depth == 1
        results = await asyncio.gather(*(j.events.get() for j in jobs))
        assert all(r.text for r in results)  # type: ignore[union-attr]
    finally:
        await pool.close()


async def test_a_death_with_several_jobs_running_blames_none(tmp_path: Path) -> None:
    pool = await make_pool(tmp_path, workers=1)
    try:
        jobs = [pool.submit(GenerateTask("a b", 500), f"c{i}", False) for i in range(2)]
        (slot,) = pool.workers()
        assert len(slot.job_ids) == 2
        slot.info.state = "dead"
        pool.died(slot, -11, set(slot.job_ids))  # SIGSEGV
        errors = [await j.events.get() for j in jobs]
        assert all(isinstance(e, WorkerCrashed) for e in errors)
        pool.poison.check(GenerateTask("a b", 500), "c0", pool.ref)  # not refused
    finally:
        await pool.close()
