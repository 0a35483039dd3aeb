"""The swap sequence (engine/swap.py) on a real store and real pools over fake workers: what
serves at each step, what waits, what is refused, and what is left running."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import pytest
from conftest import make_config
from tiny_gguf import write_tiny_llama

from sidecar.domain.errors import FailedPrecondition, SwapRefused, Unavailable
from sidecar.domain.specs import ModelFacts, RunnerSpec
from sidecar.domain.types import GenerateTask, Generation
from sidecar.engine.fake import FakeSlot
from sidecar.engine.local import PoolEngine
from sidecar.engine.slots import Events

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("m2") / "tiny2.gguf", seed=2, n_ctx=4096)


class Recorded(FakeSlot):
    """A fake worker that the test can see, slow down, or make fail to load a file."""

    made: ClassVar[list[Recorded]] = []
    start_delay_s = 0.0
    refuse: Path | None = None  # a worker on this file fails to load

    def __init__(self, spec: RunnerSpec, events: Events) -> None:
        super().__init__(spec, events)
        Recorded.made.append(self)

    async def start(self) -> ModelFacts:
        await asyncio.sleep(self.start_delay_s)
        if self.refuse is not None and self.spec.path == self.refuse:
            raise FailedPrecondition(f"worker for {self.spec.path} exited while loading")
        return await super().start()


@pytest.fixture
async def engine(
    short_dir: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[PoolEngine]:
    monkeypatch.setattr(Recorded, "made", [])
    config = make_config(short_dir, tiny_model, workers=2, context=1024)
    config = replace(config, store=replace(config.store, drain_seconds=5.0, swap_wait_seconds=5.0))
    e = PoolEngine(config, make_slot=Recorded)
    await e.start()
    yield e
    await e.close()


def recorder() -> tuple[list[str], Any]:
    stages: list[str] = []

    def progress(stage: str, detail: str = "", done: int = 0, total: int = 0) -> None:
        stages.append(stage)

    return stages, progress


async def generate(engine: PoolEngine, prompt: str, tokens: int) -> Generation:
    result = await engine.run("", GenerateTask(prompt, tokens), "app")
    assert isinstance(result, Generation)
    return result


async def test_side_by_side_flips_new_requests_while_running_ones_finish_on_the_old_model(
    engine: PoolEngine, second_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = engine.ref("").version
    old_workers = engine.pools["default"].workers()
    monkeypatch.setattr(FakeSlot, "token_delay_s", 0.01)
    running = asyncio.ensure_future(generate(engine, "long", 60))  # ~0.6 s on an old worker
    await asyncio.sleep(0.05)
    stages, progress = recorder()
    result = await engine.swap("default", path=second_model, progress=progress)
    assert stages == ["adding", "validating", "memory", "loading", "canary", "flipping",
                      "draining", "done"]  # fmt: skip
    assert result.old.version == old and result.new.version == engine.ref("").version != old
    assert (await running).model.version == old  # finished where it started, not cut off
    assert (await generate(engine, "after", 2)).model.version == result.new.version
    # The old workers were drained and stopped; only the proven ones remain.
    assert all(w.info.state == "stopped" for w in old_workers)
    assert engine.pools["default"].workers() == Recorded.made[2:]
    assert engine.status()[0][0].last_swap.startswith(f"{old} -> {result.new.version}")
    assert engine.store.active("default").startswith(result.new.version)


async def test_replace_holds_new_requests_until_the_new_model_serves(
    engine: PoolEngine, second_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Recorded, "start_delay_s", 0.3)
    stages, progress = recorder()
    swap = asyncio.ensure_future(
        engine.swap("default", path=second_model, strategy="replace", progress=progress)
    )
    while "loading" not in stages:  # the old workers are gone, the new ones not yet up
        await asyncio.sleep(0.01)
    assert engine.pools["default"].paused and not engine.pools["default"].ready
    waiting = await generate(engine, "waits", 2)  # queued, not refused
    result = await swap
    assert waiting.model.version == result.new.version
    assert stages.index("pausing") < stages.index("draining") < stages.index("loading")
    assert not engine.pools["default"].paused


async def test_replace_fails_requests_that_wait_too_long_with_retry_advice(
    engine: PoolEngine, second_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.config = replace(
        engine.config, store=replace(engine.config.store, swap_wait_seconds=0.1)
    )
    monkeypatch.setattr(Recorded, "start_delay_s", 1.0)
    stages, progress = recorder()
    swap = asyncio.ensure_future(
        engine.swap("default", path=second_model, strategy="replace", progress=progress)
    )
    while "loading" not in stages:
        await asyncio.sleep(0.01)
    with pytest.raises(Unavailable, match="being replaced; retry"):
        await generate(engine, "waits too long", 2)
    assert (await swap).new.version == engine.ref("").version


async def test_replace_whose_new_model_cannot_load_rolls_back_to_the_old_model(
    engine: PoolEngine, second_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = engine.ref("").version
    pool = engine.pools["default"]
    blob = engine.store.blob(engine.store.add(second_model, "default"))
    monkeypatch.setattr(Recorded, "refuse", blob)
    stages, progress = recorder()
    with pytest.raises(SwapRefused, match="exited while loading"):
        await engine.swap("default", version=blob.stem, strategy="replace", progress=progress)
    assert stages.index("draining") < stages.index("rolling back") and stages[-1] == "failed"
    assert engine.ref("").version == old and pool.ready and not pool.paused
    assert (await generate(engine, "still", 2)).model.version == old
    last = engine.status()[0][0].last_swap
    assert last.startswith("refused") and "at loading" in last and "quarantined as" in last
    assert len(engine.store.versions("default")) == 1  # the refused version left the store
    assert not engine.swapper.busy("default")


async def test_a_worker_that_cannot_load_refuses_the_swap_and_its_siblings_are_stopped(
    engine: PoolEngine, second_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = engine.ref("").version
    serving = engine.pools["default"].workers()
    blob = engine.store.blob(engine.store.add(second_model, "default"))
    monkeypatch.setattr(Recorded, "refuse", blob)
    stages, progress = recorder()
    with pytest.raises(SwapRefused, match="exited while loading") as e:
        await engine.swap("default", version=blob.stem, progress=progress)
    assert e.value.stage == "loading" and "flipping" not in stages
    assert engine.ref("").version == old and engine.pools["default"].workers() == serving
    started_for_the_swap = Recorded.made[2:]
    assert started_for_the_swap and all(w.info.state == "stopped" for w in started_for_the_swap)
    assert engine.in_use().keys() == {engine.store.active("default")}


async def test_swapping_to_what_already_serves_changes_nothing(
    engine: PoolEngine, tiny_model: Path
) -> None:
    before = engine.pools["default"].workers()
    stages, progress = recorder()
    result = await engine.swap("default", path=tiny_model, progress=progress)
    assert result.old == result.new and stages == ["adding", "done"]
    assert engine.pools["default"].workers() == before and len(Recorded.made) == 2
