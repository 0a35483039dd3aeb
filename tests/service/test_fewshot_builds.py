"""Few-shot builds never crowd out live requests: abandoned builds stop, builds per caller
are bounded, build work waits behind live requests, and the vector cache stays capped."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from sidecar.client import AsyncClient

pytestmark = pytest.mark.asyncio


def example_set(tag: str, n: int) -> list[tuple[str, str]]:
    return [(f"{tag} example {i} about topic {i % 7} " * 2, f"label{i % 5}") for i in range(n)]


async def test_abandoned_builds_do_not_clog_the_queue(serve, tiny_model: Path) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=2048,
                    model_keys={"max_queue": 16})  # fmt: skip
    (pool,) = s.running.local.pools.values()
    clients = [AsyncClient(s.socket, caller=f"builder{i}") for i in range(17)]
    try:
        calls = [
            c.classify("which one", examples=example_set(f"set{i}", 2000), timeout=1.0)
            for i, c in enumerate(clients)
        ]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        codes = {o.code() for o in outcomes if isinstance(o, grpc.aio.AioRpcError)}
        assert codes <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
        # A normal request right after: served promptly, never RESOURCE_EXHAUSTED.
        t0 = time.monotonic()
        for i in range(5):
            reply = await s.client.generate(f"normal {i}", max_tokens=2, timeout=10)
            assert reply.usage.completion_tokens >= 1
        assert time.monotonic() - t0 < 8.0  # loose: five tiny requests
        # Nobody waits for the builds any more: their work leaves the queue.
        for _ in range(100):
            if pool._queue.background == 0 and not s.running.fewshot.builds.in_flight:
                break
            await asyncio.sleep(0.05)
        assert pool._queue.background == 0 and not s.running.fewshot.builds.in_flight
    finally:
        for c in clients:
            await c.close()


async def test_builds_per_caller_are_bounded_and_live_requests_go_first(
    serve, tiny_model: Path
) -> None:
    from sidecar.engine.fake import FakeSlot
    from sidecar.fewshot.builds import MAX_BUILDS_PER_CALLER

    s = await serve(tiny_model, workers=2)
    FakeSlot.token_delay_s = 0.3  # each embed job holds its worker a while
    try:
        builds = [
            asyncio.ensure_future(
                s.client.classify("x", examples=example_set(f"s{i}", 400), timeout=30)
            )
            for i in range(MAX_BUILDS_PER_CALLER)
        ]
        await asyncio.sleep(0.5)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await s.client.classify("x", examples=example_set("one too many", 400))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"at most {MAX_BUILDS_PER_CALLER} at once" in (e.value.details() or "")
        # Build work never holds both workers: a live request starts at once.
        other = AsyncClient(s.socket, caller="other")
        try:
            for i in range(3):
                reply = await other.generate(f"one two {i}", max_tokens=1, timeout=5)
                assert reply.timings.queue_ms < 150, reply.timings
        finally:
            await other.close()
        assert not any(b.done() for b in builds)
        for b in builds:
            b.cancel()
    finally:
        FakeSlot.token_delay_s = 0.0


async def test_the_vector_cache_stays_under_its_cap(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    s = await serve(tiny_model, workers=1)
    fewshot = s.running.fewshot
    cache = short_dir / "store/router/examples"
    await s.client.classify("x", examples=example_set("first", 100))
    one_set = sum(p.stat().st_size for p in cache.iterdir())
    fewshot.builds.cache.max_bytes = int(one_set * 2.5)
    for i in range(4):
        await s.client.classify("x", examples=example_set(f"more{i}", 100))
        assert sum(p.stat().st_size for p in cache.iterdir()) <= fewshot.builds.cache.max_bytes
    assert len(list(cache.glob("*.npy"))) == 2  # the two most recent sets
    # An evicted set is simply embedded again.
    fewshot.builds._built.clear()
    r = await s.client.classify("first example 3", examples=example_set("first", 100))
    assert r.label.startswith("label")


async def test_an_abandoned_build_resumes_where_it_stopped(serve, tiny_model: Path) -> None:
    from sidecar.engine.fake import FakeSlot
    from sidecar.fewshot.pacing import MAX_TEXTS

    s = await serve(tiny_model, workers=1)
    (pool,) = s.running.local.pools.values()
    fewshot = s.running.fewshot
    examples = example_set("resume", 800)
    FakeSlot.token_delay_s = 0.02  # per embed job: ~1 s for the whole set
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await s.client.classify("x", examples=examples, timeout=0.5)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.sleep(0.2)
        first = pool._slots[0].info.requests
        await asyncio.sleep(0.3)
        assert pool._slots[0].info.requests == first  # nobody waits: the build stopped
        (partial,) = fewshot.embedder._partial.values()
        had = int(partial.have.sum())
        assert 0 < had < len(examples)  # ... part way, and kept what it had
        await s.client.classify("x", examples=examples, timeout=30)
        jobs = pool._slots[0].info.requests - first
        assert jobs <= -(-(len(examples) - had) // MAX_TEXTS) + 2  # the rest, + the text
    finally:
        FakeSlot.token_delay_s = 0.0


def write_task(folder: Path, n: int) -> object:
    import csv

    from sidecar.config import TaskConfig

    path = folder / "big.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(example_set("restart", n))
    return TaskConfig("big", path, "text", "label", "", "", -1.0, False, cascade=False)


async def test_a_daemon_stopped_mid_build_resumes_it_with_the_same_vectors(
    short_dir: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    import numpy as np
    from conftest import make_config, start_app

    from sidecar.fewshot import embedding, pacing

    monkeypatch.setattr(embedding, "CHECKPOINT_S", 0.0)  # save after every job
    monkeypatch.setattr(pacing, "MAX_TEXTS", 4)  # many small jobs: time to stop part way
    n = 400
    task = write_task(short_dir, n)
    embedded: list[int] = []
    job = embedding.Embedder._job

    async def counting(self: embedding.Embedder, model: str, batch: tuple[str, ...], caller: str):  # type: ignore[no-untyped-def]
        embedded.append(len(batch))
        return await job(self, model, batch, caller)

    monkeypatch.setattr(embedding.Embedder, "_job", counting)

    def config(store: str):  # type: ignore[no-untyped-def]
        c = make_config(short_dir, tiny_model, store=short_dir / store, workers=1, context=2048)
        return replace(c, tasks=(task,))

    async def built(app) -> np.ndarray:  # type: ignore[no-untyped-def]
        for _ in range(1200):
            if app.fewshot.builds.progress.get("big") == "ready":
                (vectors,) = Path(app.config.store.path, "router/examples").glob("*.npy")
                return np.load(vectors)
            await asyncio.sleep(0.05)
        raise AssertionError("the task was never ready")

    # First start: stop the daemon once part of the set is saved.
    app = await start_app(config("store"), slot_kind="process")
    examples = Path(app.config.store.path, "router/examples")
    try:
        for _ in range(1200):
            saved = list(examples.glob("*.partial.npz"))
            if saved:
                with np.load(saved[0]) as z:
                    if z["have"].sum() >= 40:
                        break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("no partial build was saved")
    finally:
        await app.stop(grace=0)
    (saved,) = examples.glob("*.partial.npz")
    with np.load(saved) as z:
        had = int(z["have"].sum())
    assert 0 < had < n, had
    assert not list(examples.glob("*.npy"))  # not finished

    # Second start, same store: only the rest is embedded.
    embedded.clear()
    app = await start_app(config("store"), slot_kind="process")
    try:
        resumed = await built(app)
    finally:
        await app.stop(grace=0)
    assert sum(embedded) == n - had
    assert not list(examples.glob("*.partial.npz"))  # finished: the partial file is gone

    # A build from scratch makes exactly the same vectors.
    embedded.clear()
    app = await start_app(config("fresh"), slot_kind="process")
    try:
        fresh = await built(app)
    finally:
        await app.stop(grace=0)
    assert sum(embedded) == n
    assert np.array_equal(resumed, fresh)
