"""Self-healing under load: crashed, hung, bloated and crash-looping workers; memory pressure;
health transitions. Real worker processes running real llama.cpp on tiny GGUF models."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.client import AsyncClient

pytestmark = pytest.mark.asyncio

FAST = {"ping_interval_seconds": 0.1, "hang_seconds": 1.5, "probe_interval_seconds": 0.5}
CALL_TIMEOUT = 20.0  # a call that takes this long counts as hung


async def load(client: AsyncClient, stop: asyncio.Event, outcomes: Counter[str]) -> None:
    """One client sending unary, streaming and classify calls until told to stop."""
    i = 0
    while not stop.is_set():
        i += 1
        try:
            if i % 3 == 0:
                async for _ in client.generate_stream(
                    f"stream {i}", max_tokens=24, timeout=CALL_TIMEOUT
                ):
                    pass
            elif i % 3 == 1:
                await client.generate(f"unary {i}", max_tokens=16, timeout=CALL_TIMEOUT)
            else:
                await client.classify(f"text {i}", ["alpha", "beta"], timeout=CALL_TIMEOUT)
            outcomes["OK"] += 1
        except grpc.aio.AioRpcError as e:
            outcomes[e.code().name] += 1
            await asyncio.sleep(0.05)


async def under_load(s, action, clients: int = 4, after: float = 0.5) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()
    conns = [AsyncClient(s.socket, caller=f"app{i}") for i in range(clients)]
    tasks = [asyncio.create_task(load(c, stop, outcomes)) for c in conns]
    await asyncio.sleep(after)
    await action()
    stop.set()
    await asyncio.gather(*tasks)
    for c in conns:
        await c.close()
    return outcomes


async def wait_for(predicate, timeout: float = 30.0, step: float = 0.1):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(step)
    raise AssertionError("condition not reached in time")


async def pids(s) -> list[int]:
    return [w.pid for w in (await s.client.status()).models[0].workers]


async def test_kill_9_of_a_worker_under_load_loses_nothing_but_its_requests(
    serve, tiny_model: Path
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=2, context=1024, server=FAST)
    victim = (await pids(s))[0]

    async def kill_and_wait() -> None:
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> bool:
            st = await s.client.status()
            return victim not in await pids(s) and all(
                w.state in ("idle", "busy") for w in st.models[0].workers
            )

        await wait_for(replaced)
        await asyncio.sleep(0.5)  # keep the load on the fresh worker for a moment

    outcomes = await under_load(s, kill_and_wait)
    assert outcomes["OK"] > 10
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes  # none hung, none INTERNAL
    st = await s.client.status()
    assert st.models[0].restarts == 1
    assert "exited" in st.models[0].last_error
    assert await s.client.health("sidecar.v1.Inference") == "SERVING"


async def test_a_stopped_worker_is_detected_as_hung_killed_and_replaced(
    serve, tiny_model: Path
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=2, context=1024, server=FAST)
    victim = (await pids(s))[0]

    async def stop_and_wait() -> None:
        os.kill(victim, signal.SIGSTOP)
        await wait_for(lambda: _gone(s, victim))
        await asyncio.sleep(0.5)

    outcomes = await under_load(s, stop_and_wait)
    assert outcomes["OK"] > 10
    assert set(outcomes) <= {"OK", "UNAVAILABLE", "INVALID_ARGUMENT"}, outcomes
    # A hang is blamed on the request the worker was running (see engine/poison.py).
    assert outcomes["INVALID_ARGUMENT"] <= 1, outcomes
    assert (await s.client.status()).models[0].restarts == 1


async def _gone(s, pid: int) -> bool:
    return pid not in await pids(s)


async def test_health_follows_the_only_worker_down_and_up(serve, tiny_model: Path) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=1024, server=FAST)
    stub = health_pb2_grpc.HealthStub(s.client.channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="sidecar.v1.Inference/default"))
    seen = [(await watch.read()).status]
    os.kill((await pids(s))[0], signal.SIGKILL)
    while len(seen) < 3:
        seen.append((await asyncio.wait_for(watch.read(), 30)).status)
    watch.cancel()
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    assert seen == [serving, not_serving, serving]


async def test_a_worker_that_keeps_failing_to_load_backs_off_and_the_daemon_stays_responsive(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=1024, server=FAST)
    served = Path((await s.client.status()).models[0].path)  # the store's copy
    broken = short_dir / "broken"
    broken.write_bytes(b"GGUF" + os.urandom(256))
    os.replace(broken, served)  # disk rot: the running worker keeps its mapping of the old file
    os.kill((await pids(s))[0], signal.SIGKILL)
    backoffs: list[float] = []

    async def grown() -> bool:
        m = (await s.client.status(timeout=2)).models[0]
        backoffs.append(m.backoff_s)
        return m.backoff_s >= 4.0

    await wait_for(grown, timeout=40, step=0.2)
    m = (await s.client.status()).models[0]
    assert "restart failed" in m.last_error
    assert not m.ready
    assert sorted(backoffs) == backoffs  # it only grew
    assert await s.client.health("") == "SERVING"
    assert await s.client.health("sidecar.v1.Inference") == "NOT_SERVING"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.client.generate("x", timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_memory_pressure_sheds_new_requests_with_a_retry_hint(
    serve, tiny_model: Path
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=1024,
                    server={**FAST, "min_available_mb": 10**9})  # fmt: skip
    await wait_for(lambda: _shedding(s))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.client.generate("x", max_tokens=1)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "memory is low" in (e.value.details() or "") and "retry" in (e.value.details() or "")
    # Shedding is not death: the model stays loaded and ready for when memory frees up.
    assert await s.client.health("sidecar.v1.Inference") == "SERVING"


async def _shedding(s) -> bool:
    return bool((await s.client.status()).shedding)


async def test_worker_over_its_rss_ceiling_is_replaced_between_requests(
    serve, tiny_model: Path
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=1024, server=FAST)
    pool = s.running.local.pools["default"]
    pool.config = replace(pool.config, max_rss_mb=1)  # any real worker is over 1 MiB
    first = (await pids(s))[0]
    for i in range(20):
        reply = await s.client.generate(f"still answering {i}", max_tokens=4, timeout=CALL_TIMEOUT)
        assert reply.usage.completion_tokens >= 1
        if first not in await pids(s):
            break
        await asyncio.sleep(0.2)
    st = (await s.client.status()).models[0]
    assert first not in [w.pid for w in st.workers]
    assert "max_rss_mb" in st.last_error
    assert st.workers[0].rss_bytes > 0
