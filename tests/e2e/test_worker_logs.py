"""The daemon's stderr under `log.format = "json"` is JSON lines only, llama.cpp's native
output included: each of its lines is a log record (issue 13). The real daemon, real
worker processes, on the tiny GGUF (fast)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from sidecar.client import Client

pytestmark = pytest.mark.e2e


def run_daemon(short_dir: Path, model: Path, level: str) -> list[str]:
    """Start the daemon, embed (llama.cpp logs while it makes the embedding context),
    generate, stop; return its stderr lines."""
    sock = short_dir / "d.sock"
    args = [sys.executable, "-m", "sidecar.cli", "serve", "--socket", str(sock),
            "--store", str(short_dir / "store"), "--model", str(model), "--workers", "1",
            "--log-format", "json", "--log-level", level]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["XDG_CONFIG_HOME"] = str(short_dir / "config")  # never the developer's own config
    err = short_dir / "stderr"
    with open(err, "w") as f:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=f, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, err.read_text()
            if sock.exists():
                try:
                    with Client(sock, timeout=5) as c:
                        if c.health("sidecar.v1.Inference") == "SERVING":
                            c.embed(["hello world"])
                            c.generate("Hi", max_tokens=2)
                            break
                except grpc.RpcError:
                    pass
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return err.read_text().splitlines()


def test_json_logs_stay_json_with_llama_cpp_output_as_debug_records(
    short_dir: Path, tiny_model: Path
) -> None:
    lines = run_daemon(short_dir, tiny_model, "debug")
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line on stderr: {line!r}")
    native = [r for r in records if "pooling_type" in r["msg"]]
    assert native, "llama.cpp's log should be there at debug level"
    assert all(r["level"] == "debug" and r["logger"].startswith("sidecar.worker") for r in native)
    assert all(isinstance(r["worker"], int) for r in native)  # which worker said it
    assert any(r["msg"].startswith("gRPC API on unix:") for r in records)


def test_at_info_llama_cpp_internals_are_not_logged(short_dir: Path, tiny_model: Path) -> None:
    lines = run_daemon(short_dir, tiny_model, "info")
    records = [json.loads(line) for line in lines]  # every line is JSON
    assert records and not [r for r in records if "pooling_type" in r["msg"]]


def test_a_workers_last_words_before_a_native_abort_are_a_record() -> None:
    # What ggml prints on a failed assertion goes to fd 2 and is followed by abort(): the
    # line must still arrive, as a JSON record, though the worker died at once.
    code = (
        "import os; from sidecar.worker import native_log; native_log.capture('info', 'json'); "
        "os.write(2, b'GGML_ASSERT(x) failed\\n'); os.abort()"
    )
    # run() reads stderr to its end, which comes when the reader has written and exited.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGABRT
    records = [json.loads(line) for line in out.stderr.splitlines()]
    assert any("GGML_ASSERT(x) failed" in r["msg"] and r["level"] == "warning" for r in records)
