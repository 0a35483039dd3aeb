"""Child processes that never outlive the benchmark, loopback ports, and a clean exit on
Ctrl-C, SIGTERM or SIGHUP."""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from types import FrameType, TracebackType


class Children:
    """The subprocesses a benchmark started; closing it stops every one still running.

    Each child gets its own session: a Ctrl-C in the terminal reaches only the benchmark,
    which then stops its children in order, instead of them dying under a measurement in
    flight (and the benchmark recording that as a failure of what it measures).
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()

    def spawn(
        self, cmd: Sequence[str], logfile: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `cmd` with stdout and stderr appended to `logfile` (discarded without one)."""
        with open(logfile or "/dev/null", "ab") as out:
            p = subprocess.Popen(
                list(cmd),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], grace: float = 15.0) -> int:
        """SIGTERM, `grace` seconds to exit, then SIGKILL; the exit code."""
        if p.poll() is None:
            with suppress(ProcessLookupError):
                p.terminate()
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    p.kill()
                p.wait()
        with suppress(ValueError):
            self.procs.remove(p)
        return p.returncode

    def close(self) -> None:
        for p in list(self.procs):
            self.stop(p, grace=5.0)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (benchmarks listen on loopback only)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _exit_on(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a benchmark's `main` so that every way of stopping it unwinds its `finally`
    blocks (children stopped, partial results written): Ctrl-C even if the shell started
    us with SIGINT ignored, SIGTERM and SIGHUP as exits. Ctrl-C exits 130, as a shell would."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _exit_on)
    signal.signal(signal.SIGHUP, _exit_on)
    try:
        return main(argv)
    except KeyboardInterrupt:
        return 130
