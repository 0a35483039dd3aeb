"""Load on demand, keep-alive, idle unload and the memory budget, through the real gRPC
daemon: fake workers for the policy, tiny llama.cpp worker processes for the memory."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from click.testing import CliRunner
from conftest import start_app
from tiny_gguf import write_tiny_llama

from sidecar.cli.commands import main
from sidecar.client import AsyncClient
from sidecar.config import Overrides, load
from sidecar.engine import local
from sidecar.engine.fake import FakeSlot
from sidecar.v1 import inference_pb2 as pb

pytestmark = pytest.mark.asyncio

LOAD_S = 0.3  # how long a SlowStart worker takes to load


class SlowStart(FakeSlot):
    """A fake worker whose load takes LOAD_S, so that waiting for it is measurable."""

    async def start(self) -> Any:
        await asyncio.sleep(LOAD_S)
        return await super().start()


@pytest.fixture
def models(short_dir: Path) -> tuple[Path, Path]:
    a = write_tiny_llama(short_dir / "a.gguf", seed=21, n_ctx=4096)
    b = write_tiny_llama(short_dir / "b.gguf", seed=22, n_ctx=4096)
    return a, b


Daemon = Callable[..., Awaitable[tuple[Any, AsyncClient]]]


@pytest.fixture
async def daemon(
    short_dir: Path, models: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Daemon]:
    """`app, client = await daemon(budget_mb=..., a={...}, b={...})`: models a (the
    default) and b, on demand unless a table says otherwise."""
    monkeypatch.setitem(local.SLOT_KINDS, "slow", SlowStart)
    running: list[tuple[Any, AsyncClient]] = []

    async def start(
        slot_kind: str = "slow", budget_mb: int = 0, probe_s: float = 30.0, **tables: dict[str, Any]
    ) -> Any:
        def table(name: str, path: Path) -> str:
            # 2048-token window: a worker's KV holds it twice (its one sequence slot and the
            # spare for prefixes and Classify), 4096 cells as the budget tests count.
            keys = {"load": "on_demand", "workers": 1, "context": 2048, **tables.get(name, {})}
            body = "\n".join(
                f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in keys.items()
            )
            return f'[models.{name}]\npath = "{path}"\n{body}\n'

        cfg = short_dir / "c.toml"
        cfg.write_text(
            f'default_model = "a"\n[server]\nsocket = "{short_dir / "s.sock"}"\n'
            f"ping_interval_seconds = 0.05\nmax_model_memory_mb = {budget_mb}\n"
            f"probe_interval_seconds = {probe_s}\n"
            f'[store]\npath = "{short_dir / "store"}"\n'
            + table("a", models[0])
            + table("b", models[1])
        )
        app = await start_app(load(Overrides(config=cfg), env={}), slot_kind=slot_kind)
        client = AsyncClient(app.config.server.socket)
        running.append((app, client))
        return app, client

    yield start
    for app, client in running:
        await client.close()
        await app.stop(grace=0)


async def states(client: AsyncClient) -> dict[str, pb.ModelStatus]:
    return {m.model.name: m for m in (await client.status()).models}


async def until(check: Callable[[], Awaitable[bool]], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


async def residency(client: AsyncClient, rpc: str, model: str) -> pb.ResidencyReply:
    reply: pb.ResidencyReply = await getattr(client.admin, rpc)(pb.ResidencyRequest(model=model))
    return reply


async def test_an_on_demand_model_starts_unloaded_and_its_first_request_waits_for_the_load(
    daemon: Daemon,
) -> None:
    _, client = await daemon()
    st = await states(client)
    assert st["a"].state == "unloaded" and st["a"].on_demand and not st["a"].workers
    assert st["a"].ready and st["a"].unload_in_s == -1
    assert st["a"].model.version  # the version it will load is known already
    # Unloaded on-demand models do not make the daemon (or the model) NOT_SERVING.
    assert await client.health("sidecar.v1.Inference") == "SERVING"
    assert await client.health("sidecar.v1.Inference/a") == "SERVING"

    cold = await client.generate("hi", max_tokens=2)
    assert cold.timings.queue_ms >= LOAD_S * 1000 * 0.9  # the wait for the load shows
    warm = await client.generate("hi", max_tokens=2)
    assert warm.timings.queue_ms < LOAD_S * 1000 / 3
    st = await states(client)
    assert st["a"].state == "loaded" and len(st["a"].workers) == 1
    assert st["a"].in_flight == 0 and 0 < st["a"].unload_in_s <= 300
    assert st["b"].state == "unloaded"  # untouched


async def test_concurrent_first_requests_share_one_load(daemon: Daemon) -> None:
    app, client = await daemon()
    replies = await asyncio.gather(*(client.generate("hi", max_tokens=1) for _ in range(5)))
    assert all(r.text for r in replies)
    assert app.local.pools["a"].workers()[0].info.requests == 5
    assert len(app.local.pools["a"].workers()) == 1


async def test_keep_alive_unloads_an_idle_model_and_the_next_request_loads_it_again(
    daemon: Daemon,
) -> None:
    app, client = await daemon(a={"keep_alive": 0.4})
    await client.generate("hi", max_tokens=1)
    loaded = await states(client)
    assert loaded["a"].state == "loaded" and loaded["a"].unload_in_s <= 0.4

    async def unloaded() -> bool:
        return (await states(client))["a"].state == "unloaded"

    await until(unloaded)
    assert not app.local.pools["a"].workers()
    again = await client.generate("hi", max_tokens=1)
    assert again.timings.queue_ms >= LOAD_S * 1000 * 0.9
    assert (await states(client))["a"].state == "loaded"


async def test_a_model_with_a_request_in_flight_is_not_unloaded_past_its_keep_alive(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FakeSlot, "token_delay_s", 0.1)
    _, client = await daemon(a={"keep_alive": 0.2})
    reply = await client.generate("hi", max_tokens=8)  # ~0.8 s of work, 4x the keep_alive
    assert reply.text
    assert (await states(client))["a"].state == "loaded"


async def test_readiness_probes_neither_load_an_unloaded_model_nor_keep_one_loaded(
    daemon: Daemon,
) -> None:
    app, client = await daemon(probe_s=0.1, a={"keep_alive": 0.6})
    await asyncio.sleep(0.5)  # several probe rounds
    assert (await states(client))["a"].state == "unloaded"
    await client.generate("hi", max_tokens=1)

    async def unloaded() -> bool:
        return (await states(client))["a"].state == "unloaded"

    await until(unloaded)  # probes kept running all along
    assert app.supervisor.probe_errors["a"] is None


async def test_load_and_unload_by_hand(daemon: Daemon) -> None:
    _, client = await daemon(b={"load": "at_start"})
    loaded = await residency(client, "Load", "a")
    assert loaded.changed and loaded.model.state == "loaded" and loaded.seconds >= LOAD_S * 0.9
    assert not (await residency(client, "Load", "a")).changed
    gone = await residency(client, "Unload", "b")  # loaded at start: unloadable by hand too
    assert gone.changed and gone.model.state == "unloaded" and not gone.model.workers
    assert not (await residency(client, "Unload", "b")).changed
    assert (await client.generate("hi", model="b", max_tokens=1)).model.name == "b"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await residency(client, "Load", "nope")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_load_whose_caller_leaves_runs_to_its_end_and_its_workers_are_counted(
    daemon: Daemon,
) -> None:
    app, client = await daemon()
    leaving = asyncio.ensure_future(app.local.load("a"))
    await asyncio.sleep(LOAD_S / 3)  # the worker is spawned and starting
    leaving.cancel()  # the Load RPC's caller hit its deadline, or pressed Ctrl-C
    with pytest.raises(asyncio.CancelledError):
        await leaving
    await until(lambda: _state_is(client, "a", "loaded"))
    st = (await states(client))["a"]
    assert len(st.workers) == 1 and st.workers[0].state == "idle"
    gone = await residency(client, "Unload", "a")  # the pool owns them: unload stops them
    assert gone.changed and not gone.model.workers


async def _state_is(client: AsyncClient, name: str, state: str) -> bool:
    return (await states(client))[name].state == state


async def test_unload_is_refused_while_requests_are_in_flight(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FakeSlot, "token_delay_s", 0.1)
    _, client = await daemon()
    await residency(client, "Load", "a")
    running = asyncio.ensure_future(client.generate("hi", max_tokens=10))
    await until(lambda: _in_flight(client, "a"))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await residency(client, "Unload", "a")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "in flight" in (e.value.details() or "")
    assert (await running).text  # the request was not cut off


async def _in_flight(client: AsyncClient, name: str) -> bool:
    return (await states(client))[name].in_flight > 0


async def test_the_budget_unloads_the_least_recently_used_idle_model_to_load_another(
    daemon: Daemon,
) -> None:
    # Each tiny model takes ~2.5 MiB (weights + 4096 cells of KV cache): 4 MiB holds one.
    _, client = await daemon(budget_mb=4)
    await client.generate("hi", model="a", max_tokens=1)
    st = await states(client)
    assert 2 * 1024 * 1024 < st["a"].footprint_bytes < 4 * 1024 * 1024
    await client.generate("hi", model="b", max_tokens=1)
    st = await states(client)
    assert (st["a"].state, st["b"].state) == ("unloaded", "loaded")


async def test_the_budget_never_unloads_a_model_with_requests_in_flight(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FakeSlot, "token_delay_s", 0.1)
    _, client = await daemon(budget_mb=4)
    await residency(client, "Load", "a")
    running = asyncio.ensure_future(client.generate("hi", model="a", max_tokens=10))
    await until(lambda: _in_flight(client, "a"))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.generate("hi", model="b", max_tokens=1)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_model_memory_mb" in (e.value.details() or "")
    assert (await running).text
    assert (await states(client))["a"].state == "loaded"
    # Once a is idle, b gets its room.
    assert (await client.generate("hi", model="b", max_tokens=1)).model.name == "b"


async def test_a_model_that_cannot_load_fails_its_waiting_requests_and_the_daemon_serves_on(
    daemon: Daemon,
) -> None:
    app, client = await daemon(b={"load": "at_start"})
    app.local.pools["a"].spec.path.unlink()  # its store blob is gone
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.generate("hi", model="a", max_tokens=1)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no file" in (e.value.details() or "")
    st = await states(client)
    assert st["a"].state == "unloaded" and "no file" in st["a"].last_error
    assert (await client.generate("hi", model="b", max_tokens=1)).text


async def test_a_stored_file_changed_on_disk_is_refused_at_load_and_set_aside(
    daemon: Daemon,
) -> None:
    app, client = await daemon()
    blob = app.local.pools["a"].spec.path
    with blob.open("r+b") as f:  # same size, other bytes: only the hash can tell
        f.seek(-16, 2)
        f.write(b"\xff" * 16)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.generate("hi", max_tokens=1)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert not blob.exists()  # set aside, never loaded
    assert (await states(client))["a"].state == "unloaded"


async def test_a_swap_of_an_unloaded_model_proves_the_new_file_and_leaves_it_loaded(
    daemon: Daemon, short_dir: Path
) -> None:
    _, client = await daemon()
    new = write_tiny_llama(short_dir / "new.gguf", seed=23, n_ctx=4096)
    old = (await states(client))["a"].model.version
    steps = [p async for p in client.admin.Swap(pb.SwapRequest(model="a", path=str(new)))]
    assert steps[-1].ok and "canary" in [s.stage for s in steps]
    st = (await states(client))["a"]
    assert st.state == "loaded" and st.model.version == steps[-1].new.version != old
    assert (await client.generate("hi", max_tokens=1)).model.version == st.model.version
    # ...and it unloads and reloads as the new version.
    await residency(client, "Unload", "a")
    assert (await client.generate("hi", max_tokens=1)).model.version == st.model.version


async def test_the_cli_loads_and_unloads(daemon: Daemon) -> None:
    app, _ = await daemon()
    sock = str(app.config.server.socket)
    runner = CliRunner()
    loaded = await asyncio.to_thread(runner.invoke, main, ["load", "b", "--socket", sock])
    assert loaded.exit_code == 0, loaded.output
    assert "b@" in loaded.output and "loaded in" in loaded.output
    again = await asyncio.to_thread(runner.invoke, main, ["unload", "b", "--socket", sock])
    assert again.exit_code == 0 and "unloaded in" in again.output
    missing = await asyncio.to_thread(runner.invoke, main, ["load", "zz", "--socket", sock])
    assert missing.exit_code == 1 and "NOT_FOUND" in missing.output


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_unloading_stops_the_worker_processes_of_a_real_model(daemon: Daemon) -> None:
    _, client = await daemon(slot_kind="process", a={"workers": 2})
    assert not (await states(client))["a"].workers
    reply = await client.generate("hi", max_tokens=2)
    assert reply.usage.completion_tokens >= 1
    st = (await states(client))["a"]
    pids = [w.pid for w in st.workers]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    assert all(w.rss_bytes > 0 for w in st.workers)
    gone = await residency(client, "Unload", "a")
    assert gone.changed and not gone.model.workers
    assert not any(_alive(p) for p in pids)
    assert (await client.generate("hi", max_tokens=2)).usage.completion_tokens >= 1
