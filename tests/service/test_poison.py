"""One bad request must not take a model down: real llama.cpp workers on a tiny GGUF.

A request "kills its worker" here by the test sending the worker SIGSEGV (what a crash
inside llama.cpp looks like to the daemon) or SIGSTOP (a hang the supervisor must kill)
while that request, and only it, runs on the worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from sidecar.client import AsyncClient

pytestmark = pytest.mark.asyncio

FAST = {"ping_interval_seconds": 0.1, "hang_seconds": 1.5, "probe_interval_seconds": 0.5}
POISON = "the request that crashes llama.cpp " * 4
# One sequence slot per worker, so the crashing request runs alone: with several requests
# in one batch a crash blames none of them (they all fail with UNAVAILABLE, retry).
ALONE = {"parallel": 1}


async def pid_of(s) -> int:  # type: ignore[no-untyped-def]
    return (await s.client.status()).models[0].workers[0].pid


async def wait_ready(s, timeout: float = 30.0) -> float:  # type: ignore[no-untyped-def]
    """Seconds until the only worker is idle or busy again."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        w = (await s.client.status()).models[0].workers[0]
        if w.state in ("idle", "busy"):
            return time.monotonic() - t0
        await asyncio.sleep(0.05)
    raise AssertionError("the worker never came back")


async def send_and_kill(
    s,
    client: AsyncClient,
    prompt: str,
    sig: signal.Signals,  # type: ignore[no-untyped-def]
) -> tuple[grpc.StatusCode, str, bool]:
    """Stream `prompt`; once it runs on the worker, send the worker `sig`.
    Returns the call's status, its details, and whether the request reached a worker."""
    pid = await pid_of(s)
    call = client.generate_stream(prompt, max_tokens=1500, timeout=30)
    reached = False
    try:
        await call.read()  # the first token: the request is running on the worker
        reached = True
        os.kill(pid, sig)
        while await call.read() is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or "", reached
    return grpc.StatusCode.OK, "", reached


async def test_a_request_that_crashes_its_worker_is_refused_after_one_restart(
    serve, tiny_model: Path
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=2048, model_keys=ALONE)
    attacker = AsyncClient(s.socket, caller="attacker")
    victim = AsyncClient(s.socket, caller="victim")
    down_since: float | None = None
    longest_down = 0.0
    stop = asyncio.Event()

    async def other_caller() -> None:
        nonlocal down_since, longest_down
        while not stop.is_set():
            try:
                await victim.generate("hello", max_tokens=2, timeout=20)
                if down_since is not None:
                    longest_down = max(longest_down, time.monotonic() - down_since)
                down_since = None
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                down_since = down_since or time.monotonic()
            await asyncio.sleep(0.05)

    load = asyncio.create_task(other_caller())
    try:
        code, details, reached = await send_and_kill(s, attacker, POISON, signal.SIGSEGV)
        assert reached and code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert "crashed a worker" in details and "SIGSEGV" in details
        assert "not retried" in details
        for _ in range(4):  # the attacker repeats as soon as the model is back
            await wait_ready(s)
            t0 = time.monotonic()
            code, details, reached = await send_and_kill(s, attacker, POISON, signal.SIGSEGV)
            assert not reached, "an identical request reached a worker again"
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
            assert "refused without running" in details
            assert time.monotonic() - t0 < 2.0  # refused at once (loose bound)
        await wait_ready(s)
        await asyncio.sleep(0.5)  # the other caller gets a few answers on the fresh worker
    finally:
        stop.set()
        await load
        await attacker.close()
        await victim.close()
    m = (await s.client.status()).models[0]
    assert m.restarts == 1  # one restart, for the one real crash
    assert m.backoff_s == pytest.approx(0.5)  # the crash did not grow the backoff
    assert down_since is None and longest_down < 15.0, longest_down  # loose: one restart


async def test_a_request_that_hangs_its_worker_is_killed_blamed_and_refused(
    serve, tiny_model: Path
) -> None:
    s = await serve(
        tiny_model, slot_kind="process", workers=1, context=2048, model_keys=ALONE, server=FAST
    )
    code, details, reached = await send_and_kill(s, s.client, POISON, signal.SIGSTOP)
    assert reached and code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "stalled a worker" in details and "hang_seconds" in details
    await wait_ready(s)
    code, details, reached = await send_and_kill(s, s.client, POISON, signal.SIGSTOP)
    assert not reached and "refused without running" in details
    m = (await s.client.status()).models[0]
    assert m.restarts == 1 and m.backoff_s == pytest.approx(0.5)
    assert "answered no ping" in m.last_error
    assert (await s.client.generate("still here", max_tokens=2)).usage.completion_tokens >= 1


async def test_a_worker_killed_from_outside_is_not_blamed_on_its_request(
    serve, tiny_model: Path
) -> None:
    """SIGKILL comes from the OOM killer or an operator: the request may run again."""
    s = await serve(tiny_model, slot_kind="process", workers=1, context=2048, model_keys=ALONE)
    code, details, reached = await send_and_kill(s, s.client, POISON, signal.SIGKILL)
    assert reached and code == grpc.StatusCode.UNAVAILABLE and "retry" in details
    await wait_ready(s)
    code, _, reached = await send_and_kill(s, s.client, POISON, signal.SIGCONT)  # harmless
    assert reached and code == grpc.StatusCode.OK


async def test_distinct_requests_that_keep_killing_workers_get_their_caller_refused(
    serve, tiny_model: Path
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=2048, model_keys=ALONE)
    for i in range(3):
        await wait_ready(s)
        code, details, reached = await send_and_kill(s, s.client, f"{POISON} {i}", signal.SIGSEGV)
        assert reached and code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    await wait_ready(s)
    code, details, reached = await send_and_kill(s, s.client, "a new request", signal.SIGSEGV)
    assert not reached and code == grpc.StatusCode.INVALID_ARGUMENT
    assert "killed 3 workers" in details
    assert (await s.client.status()).models[0].restarts == 3


async def test_a_build_whose_embed_job_crashed_the_worker_is_not_retried(
    serve, tiny_model: Path
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=2048, model_keys=ALONE)
    (pool,) = s.running.local.pools.values()
    examples = [(f"example text number {i} " * 3, f"label{i % 4}") for i in range(2000)]
    call = asyncio.ensure_future(s.client.classify("what is it", examples=examples, timeout=60))
    for _ in range(500):  # wait until an embed job of the build runs
        jobs = [j for j in pool._running.values() if j.task.kind == "embed"]
        if jobs:
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the build never reached the worker")
    os.kill(pool.workers()[0].info.pid, signal.SIGSEGV)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    assert "crashed a worker" in (e.value.details() or "")
    await wait_ready(s)
    m = (await s.client.status()).models[0]
    assert m.restarts == 1 and m.workers[0].requests == 0  # nothing retried on the new worker


async def test_under_auto_a_request_that_crashed_its_worker_is_not_escalated(
    serve, tiny_model: Path
) -> None:
    from fake_cloud import fake_cloud, ok

    with fake_cloud() as (url, script):
        script.default = ok("the cloud took over")
        cloud = {"base_url": url, "model": "m", "retries": 0, "timeout_seconds": 2.0}
        s = await serve(
            tiny_model, slot_kind="process", workers=1, context=2048, model_keys=ALONE, cloud=cloud
        )
        (pool,) = s.running.local.pools.values()
        call = asyncio.ensure_future(s.client.generate(POISON, max_tokens=1500))
        for _ in range(500):  # wait until the worker runs it
            if any(j.task.kind == "generate" for j in pool._running.values()):
                break
            await asyncio.sleep(0.01)
        os.kill(pool.workers()[0].info.pid, signal.SIGSEGV)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
        await wait_ready(s)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await s.client.generate(POISON, max_tokens=1500)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "refused without running" in (e.value.details() or "")
        assert script.received == []  # neither the crash nor the refusal went to the cloud


async def test_copies_queued_before_the_first_one_killed_a_worker_never_run(
    serve, tiny_model: Path
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=2048, model_keys=ALONE)
    pid = await pid_of(s)
    first = s.client.generate_stream(POISON, max_tokens=1500, timeout=30)
    await first.read()  # running on the only worker
    copies = [
        asyncio.ensure_future(s.client.generate(POISON, max_tokens=1500, timeout=30))
        for _ in range(3)
    ]
    while (await s.client.status()).models[0].queue_depth < 3:  # all three wait behind it
        await asyncio.sleep(0.02)
    os.kill(pid, signal.SIGSEGV)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        while await first.read() is not grpc.aio.EOF:
            pass
    assert "crashed a worker" in (e.value.details() or "")
    for copy in copies:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await copy
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "refused without running" in (e.value.details() or "")
    await wait_ready(s)
    m = (await s.client.status()).models[0]
    assert m.restarts == 1  # the copies killed no fresh worker


async def test_many_different_killer_requests_slow_the_restarts_down(
    serve, tiny_model: Path
) -> None:
    from sidecar.engine.restarts import BACKOFF_START_S, BLAMED_FREE

    s = await serve(
        tiny_model, slot_kind="process", workers=1, context=2048, model_keys=ALONE, server=FAST
    )
    backoffs = []
    for i in range(BLAMED_FREE + 1):  # stalls: not strikes, so no caller is banned
        await wait_ready(s)
        code, details, reached = await send_and_kill(s, s.client, f"{POISON} {i}", signal.SIGSTOP)
        assert reached and code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        backoffs.append((await s.client.status()).models[0].backoff_s)
    assert backoffs[:BLAMED_FREE] == [pytest.approx(BACKOFF_START_S)] * BLAMED_FREE
    assert backoffs[-1] > BACKOFF_START_S  # past the free ones, a crash loop slows down
    await wait_ready(s)
    assert (await s.client.generate("still here", max_tokens=2)).usage.completion_tokens >= 1
