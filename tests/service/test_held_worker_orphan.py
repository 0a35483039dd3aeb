"""A worker held with SIGSTOP (background work beside live work) cannot see its daemon die
by its pipe's EOF: it asks the kernel to kill it when the daemon goes, so a daemon killed
outright leaves no stopped worker behind holding its memory. Real workers, a real pool in a
child process, SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HOLDER = """
import asyncio, sys
from dataclasses import replace
from pathlib import Path
from sidecar.config import ModelConfig
from sidecar.engine.pool import ModelPool
from sidecar.engine.slots import ProcessSlot

async def main():
    config = replace(ModelConfig(name="m", path=Path(sys.argv[1])), workers=2, threads=1)
    pool = ModelPool(config, ProcessSlot, default_max_tokens=8)
    await pool.start("0" * 64)
    pool.workers()[0].suspend(True)
    print(" ".join(str(w.info.pid) for w in pool.workers()), flush=True)
    await asyncio.sleep(600)

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_a_held_worker_dies_with_a_killed_daemon(tiny_model: Path, tmp_path: Path) -> None:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    with subprocess.Popen([sys.executable, str(script), str(tiny_model)], env=env,
                          stdout=subprocess.PIPE, text=True) as daemon:  # fmt: skip
        try:
            assert daemon.stdout is not None
            pids = [int(p) for p in daemon.stdout.readline().split()]
            assert len(pids) == 2
            # SIGSTOP is delivered asynchronously: on a loaded machine the worker may not
            # have stopped yet when the pool reports it held.
            deadline = time.monotonic() + 10
            while state(pids[0]) != "T":
                assert time.monotonic() < deadline, state(pids[0])
                time.sleep(0.02)
        finally:
            daemon.send_signal(signal.SIGKILL)  # no cleanup of any kind
            daemon.wait()
        deadline = time.monotonic() + 10
        while any(state(p) not in ("Z", "") for p in pids):
            assert time.monotonic() < deadline, [state(p) for p in pids]
            time.sleep(0.05)


def state(pid: int) -> str:
    """The kernel's state letter of `pid` ("T" stopped, "Z" dead), "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""
