"""SIGHUP through the daemon's own reload path: every section is reported, live keys reach
the running parts (the request path shows it), the rest is named as needing a restart."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from sidecar import app as daemon
from sidecar.client import AsyncClient
from sidecar.config import Config, Overrides, load

pytestmark = pytest.mark.asyncio


async def test_sighup_applies_or_names_cloud_store_and_tasks_keys(
    short_dir: Path, tiny_model: Path
) -> None:
    (short_dir / "t.csv").write_text("text,label\nmy card is gone,lost\nwhere is my card,arrival\n")
    cfg = short_dir / "c.toml"
    text = f"""
[server]
socket = "{short_dir / "s.sock"}"
grace_seconds = 0
[store]
path = "{short_dir / "store"}"
drain_seconds = 30.0
[models.m]
path = "{tiny_model}"
workers = 1
[cloud]
routing = "AUTO"
redact = false
retries = 2
[tasks.t]
file = "t.csv"
threshold = 0.5
"""
    cfg.write_text(text)

    def read() -> Config:
        return load(Overrides(config=cfg), env={})

    started: asyncio.Future[daemon.App] = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(
        daemon.serve(read(), slot_kind="fake", on_ready=started.set_result, reload=read)
    )
    running = await asyncio.wait_for(started, 60)  # the SIGHUP handler is installed by now
    client = AsyncClient(short_dir / "s.sock")
    try:
        assert (await client.generate("Hello", max_tokens=2)).text is not None
        cfg.write_text(
            text.replace('routing = "AUTO"', 'routing = "CLOUD_ONLY"')
            .replace("drain_seconds = 30.0", "drain_seconds = 5.0")
            .replace("threshold = 0.5", "threshold = 0.8")
            .replace(f'path = "{short_dir / "store"}"', f'path = "{short_dir / "other"}"')
            .replace("redact = false", "redact = true")
            .replace("retries = 2", "retries = 3")
            .replace('file = "t.csv"', 'file = "t.csv"\nlabel_scoring = true')
        )
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(200):
            note = (await client.status()).last_reload
            if note:
                break
            await asyncio.sleep(0.05)
        applied, _, pending = note.partition("; need a restart (not applied): ")
        assert applied.startswith("applied: "), note
        for key in ("store.drain_seconds", "cloud.routing", "cloud.redact", "tasks.t.threshold"):
            assert key in applied, note
        for key in ("store.path", "cloud.retries", "tasks.t.label_scoring"):
            assert key in pending, note
        # The live values reach what reads them: the request path now routes CLOUD_ONLY,
        # which with no cloud configured is refused.
        with pytest.raises(grpc.RpcError) as e:
            await client.generate("Hello", max_tokens=2)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert running.local.config.store.drain_seconds == 5.0  # read by the next swap
        assert running.router is not None
        assert running.fewshot.threshold("t") == 0.8
        assert running.local.config.store.path == short_dir / "store"
    finally:
        await client.close()
        running.stopping.set()
        assert await serving == 0


async def test_reload_keeps_the_file_a_swap_chose(serve, short_dir: Path, tiny_model: Path) -> None:
    served = await serve(tiny_model)
    pool = served.running.local.pools[served.config.default_model]
    swapped = short_dir / "store" / "blobs" / "newer"
    pool.use_file(swapped)  # what a swap leaves behind
    new = replace(served.config, models=(replace(served.config.models[0], max_queue=9),))
    served.running.reload(lambda: new)
    assert served.running.last_reload == "applied: models.default.max_queue"
    assert (pool.config.path, pool.config.max_queue) == (swapped, 9)
