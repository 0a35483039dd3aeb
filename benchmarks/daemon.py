"""`sidecar serve` as a subprocess, isolated from the user's setup: a temporary socket,
store and config file, and no SIDECAR_* variables from the environment."""

from __future__ import annotations

import os
import sys
import time
from contextlib import suppress
from pathlib import Path

import grpc

from benchmarks.procs import Children
from sidecar.client import Client

READY = "sidecar.v1.Inference"  # health service that answers SERVING once a model is proven


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}


class Daemon:
    """One daemon; `tmp` should be short (a Unix socket path must stay under ~100 bytes)."""

    def __init__(
        self,
        children: Children,
        tmp: Path,
        *,
        model: Path | str | None = None,  # a GGUF path, or a configured model's name
        tag: str = "d",
        config: str = "",
        store: Path | None = None,
        workers: int | None = None,
        threads: int | None = None,
        context: int | None = None,
        env: dict[str, str] | None = None,  # added to the clean environment
    ) -> None:
        self.children = children
        self.socket = tmp / f"{tag}.sock"
        self.logfile = tmp / f"daemon-{tag}.log"
        config_file = tmp / f"{tag}.toml"
        config_file.write_text(config)
        cmd = [sys.executable, "-m", "sidecar.cli", "--config", str(config_file), "serve"]
        cmd += ["--socket", str(self.socket), "--store", str(store or tmp / f"store-{tag}")]
        if model is not None:
            cmd += ["--model", str(model)]
        for flag, value in (("--workers", workers), ("--threads", threads), ("--context", context)):
            if value is not None:
                cmd += [flag, str(value)]
        self.started = time.monotonic()
        self.proc = children.spawn(cmd, self.logfile, clean_env() | (env or {}))

    def wait_ready(self, timeout: float = 180) -> float:
        """Wait until the daemon answers SERVING; seconds since it was started."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar serve exited {self.proc.returncode}:\n{self.tail()}")
            if self.socket.exists():
                with Client(self.socket, timeout=2) as c, suppress(grpc.RpcError):
                    if c.health(READY) == "SERVING":
                        return time.monotonic() - self.started
            time.sleep(0.1)
        raise RuntimeError(f"sidecar serve not SERVING after {timeout}s:\n{self.tail()}")

    def client(self, timeout: float = 600, caller: str | None = None) -> Client:
        """A connected client (one channel: one connection); the caller closes it."""
        c = Client(self.socket, timeout=timeout, caller=caller)
        try:
            grpc.channel_ready_future(c.channel).result(timeout=10)
        except BaseException:
            c.close()
            raise
        return c

    def tail(self, n: int = 30) -> str:
        with suppress(OSError):
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        return ""

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 30.0) -> int:
        """SIGTERM (the daemon drains), then SIGKILL after `grace`; the exit code."""
        return self.children.stop(self.proc, grace)
