"""Owning the Unix socket path: one daemon per path, stale sockets reclaimed.

A lock file beside the socket (flock, held for the daemon's life) decides who owns
the path, so two daemons started at once cannot both win. A socket file with no lock
holder is what a killed daemon leaves behind; it is removed. If something still
answers on it without holding our lock, we refuse rather than steal it.

The directory must be one no other user controls: a daemon (often root) that opened a
lock file another user planted as a symlink would truncate and write whatever the link
points at. So the directory must belong to us (or root) and be writable by nobody else,
unless it is sticky (like /tmp) and the lock and socket entries in it are ours; and the
lock is opened with O_NOFOLLOW, so a symlink there is refused, never followed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
from pathlib import Path


class SocketBusy(Exception):
    """Another live process serves this socket path."""


class SocketUnsafe(SocketBusy):
    """The path is in a place another user controls. (A SocketBusy, so every caller that
    reports a path it cannot own reports this one the same way.)"""


class SocketClaim:
    def __init__(self, path: Path, dir_mode: int = 0o700) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self._dir_mode = dir_mode
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=self._dir_mode)
        sticky = _check_dir(self.path.parent)
        if sticky:
            for entry in (self.lock_path, self.path):
                _check_ours(entry)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(self.lock_path, flags, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise SocketUnsafe(
                    f"{self.lock_path} is a symbolic link: refusing to follow it (remove it)"
                ) from None
            raise
        try:
            _check_lock_file(self.lock_path, os.fstat(fd))
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SocketBusy(
                f"another sidecar daemon (pid {holder!r}) is already serving {self.path}"
            ) from None
        except BaseException:
            os.close(fd)
            raise
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


def _check_dir(d: Path) -> bool:
    """Refuse a directory another user controls, or one under a directory another user
    controls (who could swap our directory for a link to anywhere); True if `d` itself
    is a shared sticky one."""
    real = d.resolve()
    for above in reversed(real.parents):
        _check_one(above)
    return _check_one(real)


def _check_one(d: Path) -> bool:
    st = os.stat(d)
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        raise SocketUnsafe(
            f"{d} belongs to uid {st.st_uid}, not to us (uid {me}): put the socket in a "
            "directory of our own"
        )
    if not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return False
    if not st.st_mode & stat.S_ISVTX:
        raise SocketUnsafe(
            f"{d} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}) and not "
            "sticky: put the socket in a directory of our own"
        )
    return True


def _check_ours(entry: Path) -> None:
    """In a shared sticky directory, an existing lock or socket entry must be ours."""
    try:
        st = os.lstat(entry)
    except FileNotFoundError:
        return
    if st.st_uid != os.geteuid():
        raise SocketUnsafe(
            f"{entry} belongs to uid {st.st_uid}, not to us (uid {os.geteuid()}): "
            "remove it, or put the socket in a directory of our own"
        )


def _check_lock_file(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise SocketUnsafe(f"{path} is not a regular file: remove it")
    if st.st_uid != os.geteuid():
        raise SocketUnsafe(f"{path} belongs to uid {st.st_uid}, not to us: remove it")
    if st.st_nlink != 1:  # a hard link planted to some file of ours (root's /etc/passwd)
        raise SocketUnsafe(f"{path} has {st.st_nlink} links: remove it")


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
