"""Hot swap through the real Admin.Swap RPC, real workers, tiny GGUF models."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from pathlib import Path

import grpc
import psutil
import pytest
from tiny_gguf import write_tiny_llama

from sidecar.client import AsyncClient
from sidecar.v1 import inference_pb2 as pb

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("m2") / "tiny2.gguf", seed=2, n_ctx=4096)


async def swap(client: AsyncClient, **kw: str) -> list[pb.SwapProgress]:
    return [p async for p in client.admin.Swap(pb.SwapRequest(**kw))]


async def refused(client: AsyncClient, **kw: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await swap(client, **kw)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    return e.value.details() or ""


async def version(client: AsyncClient) -> str:
    return (await client.status()).models[0].model.version


async def test_swap_to_a_new_file_proves_it_flips_and_persists(
    serve, tiny_model: Path, second_model: Path
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=2, context=1024)
    old = await version(s.client)
    steps = await swap(s.client, path=str(second_model))
    stages = [p.stage for p in steps]
    assert stages[:2] == ["adding", "validating"]
    assert (
        stages.index("loading")
        < stages.index("canary")
        < stages.index("flipping")
        < stages.index("draining")
    )
    assert steps[-1].finished and steps[-1].ok and steps[-1].old.version == old
    new = steps[-1].new.version
    assert new != old and await version(s.client) == new
    assert (await s.client.generate("hi", max_tokens=2)).model.version == new
    store = s.running.local.store
    assert store.active("default").startswith(new) and store.previous("default").startswith(old)
    # and back, by version this time
    steps = await swap(s.client, version=old)
    assert steps[-1].new.version == old
    st = (await s.client.status()).models[0]
    assert st.last_swap.startswith(f"{new} -> {old}")
    assert len(st.workers) == 2 and all(w.state == "idle" for w in st.workers)


def broken(src: Path, dst: Path, how: str) -> Path:
    data = src.read_bytes()
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "tensor_table":
        i = data.index(b"token_embd.weight") + len(b"token_embd.weight")
        data = data[:i] + b"\xff\xff\xff\x7f" + data[i + 4 :]  # absurd dimension count
    else:
        data = b"this is not a model\n" * 1000
    dst.write_bytes(data)
    return dst


@pytest.mark.parametrize(("how", "says"), [("truncated", "truncated"), ("tensor_table", "corrupt tensor table"),
                                           ("not_gguf", "not a GGUF file")])  # fmt: skip
async def test_bad_files_are_refused_quarantined_and_never_served(
    serve, tiny_model: Path, short_dir: Path, how: str, says: str
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=1024)
    old = await version(s.client)
    bad = broken(tiny_model, short_dir / f"{how}.gguf", how)
    details = await refused(s.client, path=str(bad))
    assert "swap refused at validating" in details and says in details
    assert await version(s.client) == old
    assert (await s.client.generate("still", max_tokens=1)).model.version == old
    store = s.running.local.store
    # A file the caller merely named is neither copied nor taken: only the reason is kept.
    assert not list(store.quarantine_dir.glob(f"*{how}.gguf"))
    records = list(store.quarantine_dir.glob(f"*{how}.gguf.reason"))
    assert len(records) == 1 and says in records[0].read_text()
    assert bad.exists()
    assert says in (await s.client.status()).models[0].last_swap


async def test_a_model_failing_its_canary_is_refused_and_quarantined(
    serve, tiny_model: Path, second_model: Path
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=1024)
    old = await version(s.client)
    pool = s.running.local.pools["default"]
    pool.config = replace(pool.config, canary_prompt="Say hello", canary_expect=r"^\d{40}$")
    details = await refused(s.client, path=str(second_model))
    assert "swap refused at canary" in details and "does not match" in details
    assert await version(s.client) == old
    store = s.running.local.store
    assert len(store.versions("default")) == 1  # the refused version left the store
    assert list(store.quarantine_dir.glob("*.gguf"))
    assert (await s.client.status()).models[0].workers[0].state == "idle"  # canary workers stopped


async def test_a_second_swap_during_a_swap_gets_a_clear_answer(
    serve, tiny_model: Path, second_model: Path
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=1024)
    first = asyncio.ensure_future(swap(s.client, path=str(second_model)))
    while not s.running.local.swapper.busy("default"):
        await asyncio.sleep(0.005)
    details = await refused(s.client, path=str(tiny_model))
    assert "in progress" in details
    assert (await first)[-1].ok


async def test_side_by_side_refuses_when_memory_would_not_fit(
    serve, tiny_model: Path, second_model: Path, monkeypatch
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=1024)
    old = await version(s.client)
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=1024))
    details = await refused(s.client, path=str(second_model))
    assert "swap refused at memory" in details and "strategy 'replace'" in details
    monkeypatch.undo()
    assert await version(s.client) == old


async def load(
    client: AsyncClient, stop: asyncio.Event, seen: Counter[str], errors: list[str]
) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        try:
            if i % 2:
                chunks = [
                    c async for c in client.generate_stream(f"s{i}", max_tokens=12, timeout=30)
                ]
                seen[chunks[-1].summary.model.version] += 1
            else:
                reply = await client.classify(f"t{i}", ["a", "b"], timeout=30)
                seen[reply.model.version] += 1
        except grpc.aio.AioRpcError as e:
            errors.append(f"{e.code().name}: {e.details()}")


@pytest.mark.parametrize("strategy", ["side_by_side", "replace"])
async def test_swaps_under_load_fail_no_request(
    serve, tiny_model: Path, second_model: Path, strategy: str
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=2, context=1024)
    a = await version(s.client)
    b = (await swap(s.client, path=str(second_model), strategy=strategy))[-1].new.version
    stop, seen, errors = asyncio.Event(), Counter[str](), []
    clients = [AsyncClient(s.socket, caller=f"c{i}") for i in range(4)]
    tasks = [asyncio.create_task(load(c, stop, seen, errors)) for c in clients]
    for i in range(6):
        target = a if i % 2 else b
        steps = await swap(s.client, version=target, strategy=strategy)
        assert steps[-1].new.version == target
    stop.set()
    await asyncio.gather(*tasks)
    for c in clients:
        await c.close()
    assert errors == []
    assert set(seen) <= {a, b} and sum(seen.values()) >= len(clients)
    assert (await s.client.status()).models[0].restarts == 0


async def wait_until(predicate, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.05)


async def test_drop_folder_takes_complete_files_only_and_swaps(
    serve, tiny_model: Path, second_model: Path, short_dir: Path
) -> None:
    from sidecar.dropwatch import DropWatcher

    drop = short_dir / "drop"
    s0 = await serve(tiny_model, slot_kind="process", workers=1, context=1024)
    old = await version(s0.client)
    watcher = DropWatcher(s0.running.local, drop, auto_swap=True)
    await watcher.start()
    try:
        # A copy in progress: a temporary name, then a rename into place.
        partial = drop / "next.gguf.partial"
        partial.write_bytes(second_model.read_bytes()[:1000])
        await asyncio.sleep(1.5)
        assert watcher.results == [] and await version(s0.client) == old
        partial.write_bytes(second_model.read_bytes())
        partial.rename(drop / "next.gguf")
        await wait_until(lambda: len(watcher.results) == 1)
        assert "now serves" in watcher.results[0]
        assert await version(s0.client) != old
        assert not (drop / "next.gguf").exists()  # consumed into the store
        # A bad file dropped into a per-model folder is refused and quarantined.
        (drop / "default").mkdir()
        (drop / "default" / "bad.gguf").write_bytes(b"nope" * 100)
        await wait_until(lambda: len(watcher.results) == 2)
        assert "refused" in watcher.results[1]
        assert not (drop / "default" / "bad.gguf").exists()
        assert list(s0.running.local.store.quarantine_dir.glob("*bad.gguf"))
    finally:
        await watcher.close()


async def test_daemon_watches_the_configured_drop_folder(
    tiny_model: Path, second_model: Path, short_dir: Path
) -> None:
    from conftest import make_config, start_app

    drop = short_dir / "drop"
    config = make_config(short_dir, tiny_model, workers=1, context=1024)
    config = replace(config, store=replace(config.store, drop=drop, auto_swap=True))
    from sidecar.app import App

    assert App(config).admin.drop_watcher() == ""  # not watching before it starts
    running = await start_app(config)
    client = AsyncClient(config.server.socket)
    try:
        assert (await client.status()).drop_watcher.startswith("watching")
        old = await version(client)
        (drop / "incoming.gguf.tmp").write_bytes(second_model.read_bytes())
        (drop / "incoming.gguf.tmp").rename(drop / "incoming.gguf")
        assert running.drop is not None
        await wait_until(lambda: bool(running.drop.results))
        assert await version(client) != old
    finally:
        await client.close()
        await running.stop()
