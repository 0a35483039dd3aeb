"""Probation after an adapter update, through the real daemon (gRPC, process workers on a
tiny GGUF, a signed origin folder): a new adapter version whose worker dies while it is
watched is rolled back to the version it replaced (status, metrics, not fetched again);
a healthy one serves out its probation and stays. The latency and failed-request watches
run on fake slots whose speed or failures depend on the adapter version a request carries
(a real rank-1024 adapter on a tiny model is only about 1.6x slower per request, too close
to a factor's bar to test; and a real adapter that passes its canary fails no request)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from test_adapters import adapter_origin  # type: ignore[import-not-found]

from sidecar.client import AsyncClient
from sidecar.domain.errors import FailedPrecondition, InvalidRequest
from sidecar.domain.types import GenerateTask, Result, Task
from sidecar.engine import local
from sidecar.engine.adapters import CANARY_PROMPT
from sidecar.engine.fake import FakeSlot
from sidecar.engine.latency import MIN_SAMPLES
from sidecar.fileio import sha256_file
from sidecar.v1 import inference_pb2 as pb

pytestmark = pytest.mark.asyncio


async def _until(get: Callable[[], Awaitable[Any]], timeout: float = 30.0) -> Any:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not (value := await get()):
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.05)
    return value


async def _last_rollback(client: AsyncClient) -> str:
    return (await _adapter(client)).last_rollback


async def _adapter(client: AsyncClient) -> pb.AdapterStatus:
    (model,) = (await client.status()).models
    (adapter,) = model.adapters
    return adapter


async def _serving(client: AsyncClient) -> str:
    reply = await client.generate("Hello w", max_tokens=2, adapter="fmt")
    return reply.adapter.version  # type: ignore[no-any-return]


async def _started(serve, short_dir: Path, tiny_model: Path, healthy: float):  # type: ignore[no-untyped-def]
    """A daemon serving adapter v1 (added by hand), its origin offering v2."""
    _, v1, v2, _, keys = adapter_origin(short_dir, tiny_model, (1, 2))
    s = await serve(tiny_model, slot_kind="process", workers=1, context=512, model_keys=keys,
                    update={"healthy_seconds": healthy})  # fmt: skip
    await s.client.add_model(v1, name="fmt", adapter_for="default")
    return s, sha256_file(v1)[:12], sha256_file(v2)[:12]


def _rollbacks(s: Any, cause: str) -> float:
    value = s.running.metrics.registry.get_sample_value(
        "sidecar_update_rollbacks_total", {"model": "default:fmt", "cause": cause}
    )
    return value or 0.0


async def test_an_adapter_version_whose_worker_dies_in_probation_is_rolled_back(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    s, v1, v2 = await _started(serve, short_dir, tiny_model, healthy=60)
    assert await _serving(s.client) == v1
    assert (await s.client.apply_update("default:fmt")).installed
    assert await _serving(s.client) == v2
    pid = (await s.client.status()).models[0].workers[0].pid
    os.kill(pid, signal.SIGKILL)  # the new adapter version "crashes" its worker

    text = await _until(lambda: _last_rollback(s.client))
    assert text.startswith(f"v2 ({v2}) rolled back to {v1} at "), text
    assert "unhealthy within 60s: 1 worker restart(s)" in text
    assert await _serving(s.client) == v1
    adapter = await _adapter(s.client)
    assert adapter.version == v1 and "rolled back" in adapter.last_update
    assert _rollbacks(s, "worker_died") == 1
    # The model itself was not on probation: its own status says nothing of it.
    assert (await s.client.status()).models[0].last_rollback == ""
    # v2 is remembered as bad: the next check does not install it again.
    again = await s.client.apply_update("default:fmt")
    assert not again.installed and "failed before" in again.plan
    assert await _serving(s.client) == v1


async def test_a_healthy_adapter_version_serves_out_its_probation_and_stays(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    s, _v1, v2 = await _started(serve, short_dir, tiny_model, healthy=0.5)
    assert (await s.client.apply_update("default:fmt")).installed
    for _ in range(5):
        assert await _serving(s.client) == v2

    async def passed() -> bool:
        return "healthily" in (await _adapter(s.client)).last_update

    await _until(passed)
    await asyncio.sleep(1.5)  # a few more probation passes: nothing changes
    adapter = await _adapter(s.client)
    assert adapter.version == v2 and adapter.last_rollback == ""
    assert await _serving(s.client) == v2
    assert _rollbacks(s, "worker_died") == 0


async def test_a_first_adapter_version_from_an_update_has_nothing_to_roll_back_to(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    _, _, v2_file, _, keys = adapter_origin(short_dir, tiny_model, (1, 2))
    s = await serve(tiny_model, slot_kind="process", workers=1, context=512, model_keys=keys,
                    update={"healthy_seconds": 60})  # fmt: skip
    assert (await s.client.apply_update("default:fmt")).installed
    os.kill((await s.client.status()).models[0].workers[0].pid, signal.SIGKILL)
    await asyncio.sleep(2.5)  # probation passes run every second
    assert await _serving(s.client) == sha256_file(v2_file)[:12]
    assert (await _adapter(s.client)).last_rollback == ""


class SlowAdapter(FakeSlot):
    """A fake worker that answers slowly for the adapter versions in `slow`."""

    slow: ClassVar[set[str]] = set()

    async def _answer(self, job_id: int, task: Task, stream: bool) -> Result:
        lora = getattr(task, "lora", None)
        if lora is not None and lora.sha256 in self.slow:
            await asyncio.sleep(0.05)
        return await super()._answer(job_id, task, stream)


@pytest.mark.parametrize("slower", [True, False], ids=["slower", "as-fast"])
async def test_an_adapter_version_much_slower_than_the_one_it_replaced_is_rolled_back(
    serve, tiny_model: Path, short_dir: Path, monkeypatch: pytest.MonkeyPatch, slower: bool
) -> None:
    monkeypatch.setitem(local.SLOT_KINDS, "fake", SlowAdapter)
    _, v1_file, v2_file, _, keys = adapter_origin(short_dir, tiny_model, (1, 2))
    # As fast: both take 50 ms (sub-millisecond answers of both could differ 3x by chance).
    SlowAdapter.slow = {sha256_file(f) for f in (v2_file, *(() if slower else (v1_file,)))}
    v1, v2 = sha256_file(v1_file)[:12], sha256_file(v2_file)[:12]
    s = await serve(tiny_model, model_keys={**keys, "probation_latency_factor": 3.0},
                    update={"healthy_seconds": 60 if slower else 2})  # fmt: skip
    await s.client.add_model(v1_file, name="fmt", adapter_for="default")
    for _ in range(25):  # the previous version's p99, before the flip
        assert await _serving(s.client) == v1
    for _ in range(25):  # requests without the adapter: not the adapter's latency
        await s.client.generate("hi", max_tokens=1)
    assert (await s.client.apply_update("default:fmt")).installed
    assert await _serving(s.client) == v2
    # 50 ms each against a fraction of a millisecond. Probation may roll back as soon as it
    # has MIN_SAMPLES of them, so later replies may come from v1 already.
    for _ in range(MIN_SAMPLES + 4):
        assert await _serving(s.client) in (v1, v2)
    if slower:
        text = await _until(lambda: _last_rollback(s.client))
        assert text.startswith(f"v2 ({v2}) rolled back to {v1} at "), text
        assert "p99 latency" in text and "more than 3x the previous version's" in text
        assert await _serving(s.client) == v1
        assert _rollbacks(s, "latency") == 1
    else:

        async def passed() -> bool:
            return "healthily" in (await _adapter(s.client)).last_update

        await _until(passed)
        adapter = await _adapter(s.client)
        assert adapter.version == v2 and adapter.last_rollback == ""
        assert _rollbacks(s, "latency") == 0


class FailingAdapter(FakeSlot):
    """A fake worker that fails live requests for the adapter versions in `failing` (the
    canary passes) with `error`."""

    failing: ClassVar[set[str]] = set()
    error: ClassVar[type[Exception]] = FailedPrecondition

    async def _run(self, job_id: int, task: Task, stream: bool) -> None:
        lora = getattr(task, "lora", None)
        canary = isinstance(task, GenerateTask) and task.prompt == CANARY_PROMPT
        if lora is not None and lora.sha256 in self.failing and not canary:
            self._settle(job_id)
            self.events.failed(self, job_id, self.error("llama.cpp refused to apply it"))  # type: ignore[arg-type]
            return
        await super()._run(job_id, task, stream)


@pytest.mark.parametrize("error", [FailedPrecondition, InvalidRequest], ids=["its-fault", "caller"])
async def test_an_adapter_version_whose_requests_fail_is_rolled_back(
    serve, tiny_model: Path, short_dir: Path, monkeypatch: pytest.MonkeyPatch, error: type
) -> None:
    monkeypatch.setitem(local.SLOT_KINDS, "fake", FailingAdapter)
    _, v1_file, v2_file, _, keys = adapter_origin(short_dir, tiny_model, (1, 2))
    FailingAdapter.failing, FailingAdapter.error = {sha256_file(v2_file)}, error
    v1, v2 = sha256_file(v1_file)[:12], sha256_file(v2_file)[:12]
    s = await serve(tiny_model, model_keys=keys, update={"healthy_seconds": 2})
    await s.client.add_model(v1_file, name="fmt", adapter_for="default")
    assert (await s.client.apply_update("default:fmt")).installed
    assert (await _adapter(s.client)).version == v2
    with pytest.raises(Exception, match="refused to apply"):
        await s.client.generate("Hello w", max_tokens=2, adapter="fmt")
    if error is InvalidRequest:  # the caller's to fix: says nothing about the version

        async def passed() -> bool:
            return "healthily" in (await _adapter(s.client)).last_update

        await _until(passed)
        assert (await _adapter(s.client)).version == v2
        assert _rollbacks(s, "requests_failed") == 0
        return

    text = await _until(lambda: _last_rollback(s.client))
    assert text.startswith(f"v2 ({v2}) rolled back to {v1} at "), text
    assert "1 request(s) with it failed (last: llama.cpp refused to apply it)" in text
    assert await _serving(s.client) == v1
    assert _rollbacks(s, "requests_failed") == 1


async def test_a_swap_of_the_model_to_a_file_the_adapter_does_not_fit_ends_its_probation(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    from tiny_gguf import write_tiny_llama

    s, _v1, v2 = await _started(serve, short_dir, tiny_model, healthy=60)
    assert (await s.client.apply_update("default:fmt")).installed
    narrow = write_tiny_llama(short_dir / "narrow.gguf", n_embd=32, n_head=2, n_ctx=4096)
    steps = [p async for p in s.client.admin.Swap(pb.SwapRequest(path=str(narrow)))]
    assert steps[-1].ok and steps[-1].adapters_not_fitting, steps[-1]
    with pytest.raises(Exception, match="does not fit"):
        await s.client.generate("Hello w", max_tokens=2, adapter="fmt")

    async def ended() -> str:
        last = (await _adapter(s.client)).last_update
        return last if "probation of v2" in last else ""

    text = await _until(ended, timeout=10)
    assert f"({v2}) ended: superseded by a swap of its model" in text, text
    assert "does not fit" in text, text
    await asyncio.sleep(1.5)  # a few more passes: no rollback, no retry
    adapter = await _adapter(s.client)
    assert adapter.version == v2 and adapter.last_rollback == ""
    for cause in ("requests_failed", "rollback_failed", "worker_died", "probe_failed"):
        assert _rollbacks(s, cause) == 0, cause
