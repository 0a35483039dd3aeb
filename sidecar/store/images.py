"""Decrypted models in memory only: one sealed Linux memfd per version, shared by workers.

A sealed blob is decrypted once into an anonymous memory file (`memfd_create`), which is
then sealed against any change (F_SEAL_WRITE | GROW | SHRINK, then SEAL). Workers receive
its descriptor when they are spawned and llama.cpp opens and maps `/proc/self/fd/N`, so
every worker of one version maps the same pages: one decrypted copy, however many workers.
The memory is the kernel's shmem: it is freed when the last descriptor and the last
mapping are gone, and it is never a file on disk (it can reach swap like any memory).

The daemon keeps the descriptor of each version a pool serves (`keep`), to spawn
replacement workers from the same copy; the others are closed.

Without memfd_create (not Linux) a sealed store is refused: there is no weaker mode that
writes plaintext to a temporary file.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Collection

from sidecar import coredumps
from sidecar.domain.errors import FailedPrecondition
from sidecar.store.sealed import SealedReader

PREFIX = "sidecar-"  # memfd names show in /proc/PID/maps as /memfd:sidecar-<sha> (deleted)
_SEALS = ("F_SEAL_WRITE", "F_SEAL_GROW", "F_SEAL_SHRINK", "F_SEAL_SEAL")
_STEP = 1 << 20


def supported() -> str | None:
    """None if sealed memfds work here, else why not."""
    if not hasattr(os, "memfd_create") or not all(hasattr(fcntl, s) for s in _SEALS):
        return (
            "an encrypted store needs Linux memfd_create with file seals to hand decrypted "
            "models to workers without writing them to disk; this platform has none"
        )
    return None


def sealed_memfd(reader: SealedReader, name: str) -> int:
    """A read-only, sealed memfd holding all of `reader`'s plaintext."""
    why = supported()
    if why:
        raise FailedPrecondition(why)
    coredumps.forbid()  # this process now holds plaintext (and a ThreadSlot maps it here)
    fd = os.memfd_create(PREFIX + name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, reader.size)
        buf = bytearray(_STEP)
        view = memoryview(buf)
        reader.seek(0)
        pos = 0
        while n := reader.readinto(view):
            written = 0
            while written < n:
                written += os.pwrite(fd, view[written:n], pos + written)
            pos += n
        if pos != reader.size:
            raise FailedPrecondition(f"decrypted {pos} bytes of {name}, expected {reader.size}")
        seals = 0
        for s in _SEALS:
            seals |= getattr(fcntl, s)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Images:
    """The decrypted versions the daemon holds, by sha256 (thread-safe)."""

    def __init__(self, decrypt: Callable[[str], int]) -> None:
        self._decrypt = decrypt
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._making: dict[str, threading.Lock] = {}

    def fd(self, sha: str) -> int:
        """The memfd of `sha`, decrypted now unless it is held already (one decryption
        per version, however many workers start on it at once)."""
        with self._lock:
            if sha in self._fds:
                return self._fds[sha]
            making = self._making.setdefault(sha, threading.Lock())
        with making:
            with self._lock:
                if sha in self._fds:
                    return self._fds[sha]
            fd = self._decrypt(sha)
            with self._lock:
                self._fds[sha] = fd
                self._making.pop(sha, None)
            return fd

    def dup(self, sha: str) -> int:
        """A descriptor of its own (close-on-exec; the caller closes it) of `sha`'s memfd:
        `keep` may close the shared one at any time, never this one."""
        self.fd(sha)
        with self._lock:
            if sha not in self._fds:
                raise FailedPrecondition(f"the decrypted copy of {sha[:12]} was just closed")
            return os.dup(self._fds[sha])

    def keep(self, shas: Collection[str]) -> None:
        """Close the memfds of every version not in `shas` (their workers keep their own
        mappings; the memory goes when the last of them exits)."""
        with self._lock:
            for sha in [s for s in self._fds if s not in shas]:
                os.close(self._fds.pop(sha))

    def held(self) -> set[str]:
        with self._lock:
            return set(self._fds)

    def close(self) -> None:
        self.keep(())
