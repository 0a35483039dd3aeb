"""A real Ctrl-C (SIGINT to the CLI process) during `sidecar swap` against a real daemon:
the CLI says it detached and exits 130, the swap completes, and the daemon's request log
records it as OK (not CANCELLED)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_daemon import Daemon  # type: ignore[import-not-found]
from tiny_gguf import write_tiny_llama

from sidecar.client import Client

pytestmark = pytest.mark.e2e


def test_ctrl_c_during_a_swap_detaches_and_the_swap_completes(
    short_dir: Path, tiny_model: Path
) -> None:
    second = write_tiny_llama(short_dir / "second.gguf", seed=5, n_ctx=4096)
    d = Daemon(short_dir / "d.sock", tiny_model, "--workers", "1", "--context", "1024").wait_ready()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        cli = subprocess.Popen(
            [sys.executable, "-m", "sidecar.cli", "swap", str(second), "--socket", str(d.socket)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        assert cli.stderr is not None
        # The first progress line says the swap has started (skip any library warnings).
        seen = []
        while not any("adding" in x for x in seen) and len(seen) < 20:
            seen.append(cli.stderr.readline())
            assert seen[-1], seen  # the CLI ended before the swap started
        cli.send_signal(signal.SIGINT)
        _out, err = cli.communicate(timeout=60)
        assert cli.returncode == 130, err
        assert "detached: the swap is still running on the daemon" in err
        assert "Aborted!" not in err
        deadline = time.monotonic() + 60
        with Client(d.socket) as c:
            while not c.status().models[0].last_swap and time.monotonic() < deadline:
                time.sleep(0.1)
            last = c.status().models[0].last_swap
        assert " -> " in last and "refused" not in last, last
        while "Admin/Swap" not in d.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        line = next(x for x in d.log.read_text().splitlines() if "Admin/Swap" in x)
        assert "status=OK" in line and "caller=left" in line, line
    finally:
        d.stop()
