"""Owning the Unix socket path: one daemon per path, stale sockets reclaimed.

A lock file beside the socket (flock, held for the daemon's life) decides who owns
the path, so two daemons started at once cannot both win. A socket file with no lock
holder is what a killed daemon leaves behind; it is removed. If something still
answers on it without holding our lock, we refuse rather than steal it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path


class SocketBusy(Exception):
    """Another live process serves this socket path."""


class SocketClaim:
    def __init__(self, path: Path, dir_mode: int = 0o700) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self._dir_mode = dir_mode
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=self._dir_mode)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SocketBusy(
                f"another sidecar daemon (pid {holder}) is already serving {self.path}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        if self.path.exists() or self.path.is_symlink():
            if _answers(self.path):
                self.release()
                raise SocketBusy(
                    f"a process that is not a sidecar daemon is listening on {self.path}"
                )
            self.path.unlink()  # stale: its daemon died without cleaning up

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        # The lock file stays: unlinking it while another daemon waits on it would let two win.
        os.close(self._fd)
        self._fd = None


def _answers(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(str(path))
        return True
    except OSError as e:
        return e.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK)
    finally:
        s.close()
