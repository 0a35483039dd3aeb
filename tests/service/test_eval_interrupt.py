"""Ctrl-C stops `sidecar eval` at once: the rows not yet sent are dropped (the thread pool
used to run every queued row before the interrupt took effect), the command exits 130
with a short message and no report. The real CLI as a subprocess, against a daemon whose
fake workers take a while per row."""

from __future__ import annotations

import asyncio
import csv
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from sidecar.engine.fake import FakeSlot

ROWS = 60
DELAY = 0.2  # per row: the whole set would take 6 s at concurrency 2


async def test_ctrl_c_stops_an_eval_at_once(
    serve, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(FakeSlot, "token_delay_s", DELAY)
    s = await serve(tiny_model, workers=1)
    data = tmp_path / "set.csv"
    with data.open("w", newline="") as f:
        csv.writer(f).writerows(
            [["text", "label"], *([f"abc {i}", ("abcdef", "uvwxyz")[i % 2]] for i in range(ROWS))]
        )
    empty = tmp_path / "empty.toml"
    empty.touch()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar.cli", "--config", str(empty), "eval", str(data),
        "--socket", str(s.socket), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        # wait until rows are being sent, then Ctrl-C
        (pool,) = s.running.local.pools.values()
        for _ in range(500):
            if pool.status().queue_depth or proc.returncode is not None:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(2 * DELAY)
        proc.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        out, err = await asyncio.wait_for(proc.communicate(), 10)
        took = time.monotonic() - interrupted
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130, err.decode()
    assert took < 2.0, took
    said = err.decode().strip().splitlines()[-1]
    assert said.startswith("interrupted after ") and said.endswith(f"of {ROWS} requests: no report")
    assert int(said.split()[2]) < ROWS // 3
    assert out == b""
