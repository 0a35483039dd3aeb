"""The store and swap commands of the CLI against a real daemon (tiny models), and the
daemon's systemd notifications on a real NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_daemon import Daemon  # type: ignore[import-not-found]
from tiny_gguf import write_tiny_llama

from sidecar.client import Client

pytestmark = pytest.mark.e2e

SIDECAR = [sys.executable, "-m", "sidecar.cli"]


def cli(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SIDECAR, *args, "--socket", str(sock)], capture_output=True, text=True, timeout=120
    )


def test_models_and_swap_commands(short_dir: Path, tiny_model: Path) -> None:
    second = write_tiny_llama(short_dir / "second.gguf", seed=5, n_ctx=4096)
    d = Daemon(short_dir / "d.sock", tiny_model, "--workers", "1", "--context", "1024").wait_ready()
    try:
        first = Client(d.socket).status().models[0].model.version
        out = cli(d.socket, "models", "add", str(second), "--name", "default")
        assert out.returncode == 0, out.stderr
        added = out.stdout.split("@")[1].strip()
        listing = cli(d.socket, "models").stdout
        assert f"*A  default@{first}" in listing and f"   default@{added}" in listing
        out = cli(d.socket, "models", "activate", f"default@{added[:8]}")
        assert out.returncode == 0, out.stderr
        assert f"-> {added}" in out.stdout and "canary" in out.stderr  # progress went to stderr
        assert "*A  default@" + added in cli(d.socket, "models").stdout
        bad = short_dir / "bad.gguf"
        bad.write_bytes(b"GGUF" + b"\0" * 64)
        out = cli(d.socket, "swap", str(bad))
        assert out.returncode == 1 and "refused: FAILED_PRECONDITION" in out.stderr
        out = cli(d.socket, "models", "remove", f"default@{added}")
        assert out.returncode == 1 and "is active" in out.stderr
        extra = write_tiny_llama(short_dir / "extra.gguf", seed=6, n_ctx=4096)
        cli(d.socket, "models", "add", str(extra), "--name", "default")
        out = cli(d.socket, "models", "gc")
        assert out.returncode == 0 and out.stdout.count("removed") == 1
        assert "nothing to remove" in cli(d.socket, "models", "gc").stdout
    finally:
        d.stop()


def test_systemd_hears_ready_status_watchdog_and_stopping(
    short_dir: Path, tiny_model: Path
) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    addr = short_dir / "notify"
    listener.bind(str(addr))
    listener.settimeout(60)
    env = {"NOTIFY_SOCKET": str(addr), "WATCHDOG_USEC": "2000000"}
    os.environ.update(env)
    try:
        d = Daemon(short_dir / "d.sock", tiny_model, "--workers", "1", "--context", "1024")
    finally:
        for k in env:
            os.environ.pop(k)
    messages: list[str] = []

    def until(prefix: str) -> None:
        while not any(m.startswith(prefix) for m in messages):
            messages.append(listener.recv(4096).decode())

    until("READY=1")
    # READY comes only when the model answers: health agrees at that moment.
    with Client(d.socket) as c:
        assert c.health("sidecar.v1.Inference") == "SERVING"
    until("STATUS=serving")
    until("WATCHDOG=1")
    d.proc.send_signal(signal.SIGHUP)
    until("RELOADING=1")
    d.proc.send_signal(signal.SIGTERM)
    until("STOPPING=1")
    assert d.proc.wait(30) == 0
    listener.close()
