"""What the store may delete: what no live worker maps (issue 13), through the real Admin
RPCs and the CLI. Process workers on tiny GGUFs where the mapping is the point; fake slots
where a request must be held on a draining worker."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from tiny_gguf import write_tiny_llama

from sidecar.client import AsyncClient
from sidecar.engine.fake import FakeSlot
from sidecar.v1 import inference_pb2 as pb

pytestmark = pytest.mark.asyncio


async def swap(client: AsyncClient, **kw: str) -> str:
    steps = [p async for p in client.admin.Swap(pb.SwapRequest(**kw))]
    assert steps[-1].finished and steps[-1].ok
    return str(steps[-1].new.version)


async def remove(client: AsyncClient, version: str, model: str = "default") -> None:
    await client.admin.RemoveVersion(pb.RemoveVersionRequest(model=model, version=version))


def new_version(s) -> str:  # type: ignore[no-untyped-def]
    return str(s.running.local.pools["default"].ref.version)


def mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


async def test_after_a_swap_status_shows_the_served_file_and_the_old_version_can_go(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    second = write_tiny_llama(short_dir / "second.gguf", seed=21, n_ctx=4096)
    s = await serve(tiny_model, slot_kind="process", workers=1, context=1024)
    store = s.running.local.store
    old = (await s.client.status()).models[0].model.version
    new = await swap(s.client, path=str(second))
    model = (await s.client.status()).models[0]
    served = store.blob(store.active("default"))
    assert model.path == str(served)  # not the file it started on
    worker = model.workers[0].pid
    assert str(served) in mapped(worker) and old not in mapped(worker)
    # Nothing maps the old version any more: it may go (it was "in use by a worker").
    await remove(s.client, old)
    assert not any(v.startswith(old) for v in store.versions("default"))
    assert new == (await s.client.generate("hi", max_tokens=2)).model.version


async def test_gc_keeps_what_is_mapped_or_pointed_at_and_a_version_added_under_another_name(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    files = [write_tiny_llama(short_dir / f"v{i}.gguf", seed=30 + i, n_ctx=4096) for i in range(3)]
    s = await serve(tiny_model, slot_kind="process", workers=1, context=1024)
    first = (await s.client.status()).models[0].model.version
    await swap(s.client, path=str(files[0]))
    await swap(s.client, path=str(files[1]))
    added = await s.client.admin.AddModel(pb.AddModelRequest(model="other", path=str(files[2])))
    reply = await s.client.admin.CollectGarbage(pb.CollectGarbageRequest())
    # The start-up version is neither active nor previous and no worker maps it; the one
    # just added under "other" is all that name has and must survive.
    assert list(reply.removed) == [f"default@{first}"]
    store = s.running.local.store
    assert store.versions("other") == [added.version.sha256]
    assert len(store.versions("default")) == 2


async def test_a_draining_worker_keeps_its_version_until_it_has_finished(
    serve, tiny_model: Path, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FakeSlot, "token_delay_s", 0.02)
    second = write_tiny_llama(short_dir / "second.gguf", seed=22, n_ctx=4096)
    s = await serve(tiny_model, workers=1)
    engine = s.running.local
    engine.config = replace(engine.config, store=replace(engine.config.store, drain_seconds=60.0))
    old = (await s.client.status()).models[0].model.version
    stream = s.client.generate_stream("one two three", max_tokens=400)
    pieces = stream.__aiter__()
    await pieces.__anext__()  # running on the old worker
    swapping = asyncio.ensure_future(swap(s.client, path=str(second)))
    deadline = time.monotonic() + 30
    while (await s.client.status()).models[0].model.version == old:
        assert time.monotonic() < deadline, "the swap never flipped"
        await asyncio.sleep(0.05)
    # Both run now: the new worker serves, the old one still streams to this caller.
    assert {old, new_version(s)} <= {sha[:12] for sha in engine.in_use()}
    async for _ in pieces:  # the old worker finishes its request, then it is stopped
        pass
    assert await swapping == new_version(s)
    assert old not in {sha[:12] for sha in engine.in_use()}
    await remove(s.client, old)  # now history: neither active nor mapped
    assert not any(v.startswith(old) for v in engine.store.versions("default"))


async def test_gc_bounds_the_quarantine_and_gc_quarantine_empties_it(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    from sidecar.cli.commands import main

    s = await serve(tiny_model)
    q = s.running.local.store.quarantine_dir
    bad = short_dir / "bad.gguf"
    bad.write_bytes(b"this is not a model\n" * 100)
    with pytest.raises(grpc.aio.AioRpcError):
        await swap(s.client, path=str(bad))
    ancient = q / "20000101T000000-000000000-old.gguf"
    ancient.write_bytes(b"x")
    (q / (ancient.name + ".reason")).write_text("refused long ago")
    runner = CliRunner()
    sock = ["--socket", str(s.socket)]
    out = await asyncio.to_thread(runner.invoke, main, ["models", "gc", *sock])
    assert out.exit_code == 0, out.output
    assert f"removed quarantine/{ancient.name}" in out.output  # past the age bound
    assert sorted(p.name for p in q.iterdir()) != [] and not ancient.exists()
    out = await asyncio.to_thread(runner.invoke, main, ["models", "gc", "--quarantine", *sock])
    assert out.exit_code == 0, out.output
    assert "removed quarantine/" in out.output and "bad.gguf" in out.output
    assert list(q.iterdir()) == []


async def test_what_a_worker_really_maps_is_kept_whatever_the_pointers_and_its_spec_say(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    files = [write_tiny_llama(short_dir / f"w{i}.gguf", seed=50 + i, n_ctx=4096) for i in range(2)]
    s = await serve(tiny_model, slot_kind="process", workers=1, context=1024)
    store = s.running.local.store
    served = store.active("default")
    a, b = (store.add(f, "default") for f in files)
    store.activate("default", a)
    store.activate("default", b)  # the pointers no longer name what the worker serves
    (slot,) = s.running.local.pools["default"]._slots
    slot.spec = replace(slot.spec, path=store.blob(a))  # nor does its spec
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await remove(s.client, served[:12])
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"pid {slot.info.pid}" in (refused.value.details() or "")
    reply = await s.client.admin.CollectGarbage(pb.CollectGarbageRequest())
    assert list(reply.removed) == [] and served in store.versions("default")
