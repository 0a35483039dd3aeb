"""The store's quarantine: refused files set aside with their reason, readable by us only.

    <root>/quarantine/<stamp>-<name>          the refused file (0600, dir 0700)
    <root>/quarantine/<stamp>-<name>.reason   why (alone when the file was not ours to copy)

It is for looking at what was refused, not an archive: refused models are gigabytes.
Newest first, an entry stays while it is one of the newest QUARANTINE_KEEP, younger than
QUARANTINE_DAYS and, with the newer ones, within QUARANTINE_BYTES; the newest entry
always stays, being the one an operator is about to look at.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sidecar.fileio import clone_or_copy, fsync_dir
from sidecar.store.sealed import is_sealed

QUARANTINE_KEEP = 10
QUARANTINE_DAYS = 14
QUARANTINE_BYTES = 2 << 30
_QUARANTINE_NAME = 80  # characters of the refused file's name kept in the quarantine name
_STAMP = re.compile(r"(\d{8}T\d{6})-(\d{9})-")

log = logging.getLogger("sidecar.store")


class Quarantine:
    def __init__(
        self,
        directory: Path,
        lock: threading.RLock,
        owns: Callable[[Path], bool],
        seal: Callable[[Path, Path], str] | None = None,
    ) -> None:
        """`lock`: the store's, so a trim never races its other file work; `owns`: whether a
        path is the store's own file (only those are ever copied in); `seal`: on an
        encrypted store, writes the sealed copy of a plaintext file (a refused drop is
        encrypted on its way in, never kept in plaintext)."""
        self.dir = directory
        self._lock = lock
        self._owns = owns
        self._seal = seal
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Refused files may be anything a caller pointed at: only we may read them.
        os.chmod(self.dir, 0o700)

    def put(self, src: Path, reason: str, *, move: bool = True) -> Path:
        """Set a refused file aside with its reason; return where.

        move=True: a file handed over to us (a drop) or one of our blobs is moved there.
        move=False: a blob other names may still use is copied. A file outside the store
        that a caller merely named is never copied (it may be anything they can name,
        /etc/shadow included), nor is a symbolic link followed: only the reason is
        recorded, and that record is returned."""
        now = time.time_ns()  # one reading: the name sorts in the order entries were made
        stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(now // 1_000_000_000))
        stamp += f"-{now % 1_000_000_000:09d}"
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", src.name)[-_QUARANTINE_NAME:]
        dest = self.dir / f"{stamp}-{safe}"
        record = dest.with_name(dest.name + ".reason")
        if src.is_symlink():  # a dropped link: removed, never followed
            with contextlib.suppress(OSError):
                reason = f"{reason}\n(a symbolic link to {os.readlink(src)}: removed)"
            if move:
                src.unlink(missing_ok=True)
            dest = record
        elif not move and not self._owns(src):
            reason = f"{reason}\n(not copied: {src} is not the store's file)"
            dest = record
        else:
            with contextlib.suppress(FileNotFoundError):
                if self._seal is not None and not is_sealed(src):
                    self._seal_aside(src, dest, move)
                else:
                    _set_aside(src, dest, move)
        fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(reason)
        try:
            self.cleanup()
        except OSError as e:  # a full disk must not turn a refusal into a crash
            log.warning("could not trim the quarantine: %s", e)
        return dest

    def _seal_aside(self, src: Path, dest: Path, move: bool) -> None:
        assert self._seal is not None
        try:
            self._seal(src, dest)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        if move:
            src.unlink()

    def cleanup(self, *, empty: bool = False) -> list[str]:
        """Apply the bound (QUARANTINE_KEEP, _DAYS, _BYTES; the newest entry is exempt from
        the size bound only), or with empty=True remove every entry; return the entries
        removed, oldest first. An entry is a refused file and its .reason record, or a
        record alone. Links are removed as links; directories are left."""
        with self._lock:
            groups: dict[str, list[tuple[Path, os.stat_result]]] = {}
            for p in self.dir.iterdir():
                try:
                    st = os.lstat(p)
                except FileNotFoundError:
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    groups.setdefault(p.name.removesuffix(".reason"), []).append((p, st))
            # Made time, then name: stamps differ in nanoseconds a float cannot hold.
            newest_first = sorted(groups, key=lambda k: (_made(k, groups[k]), k), reverse=True)
            cutoff = time.time() - QUARANTINE_DAYS * 86400
            total = 0
            doomed = []
            for i, key in enumerate(newest_first):
                total += sum(st.st_size for _, st in groups[key])
                if (
                    empty
                    or i >= QUARANTINE_KEEP
                    or _made(key, groups[key]) < cutoff
                    or (i > 0 and total > QUARANTINE_BYTES)
                ):
                    doomed.append(key)
            for key in doomed:
                for p, _ in groups[key]:
                    p.unlink(missing_ok=True)
            if doomed:
                fsync_dir(self.dir)
            return doomed[::-1]


def _set_aside(src: Path, dest: Path, move: bool) -> None:
    if move:
        try:
            os.replace(src, dest)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
        else:
            _make_private(dest)
            return
    clone_or_copy(src, dest, 0o600)
    if move:
        src.unlink()


def _made(key: str, files: list[tuple[Path, os.stat_result]]) -> float:
    """When a quarantine entry was made: the stamp its name starts with (a moved file
    keeps its own old mtime), else the newest mtime among its files."""
    m = _STAMP.match(key)
    if m:
        with contextlib.suppress(ValueError, OverflowError):
            return time.mktime(time.strptime(m[1], "%Y%m%dT%H%M%S")) + int(m[2]) / 1e9
    return max(st.st_mtime for _, st in files)


def _make_private(path: Path) -> None:
    # By descriptor and without following links: the name may have been swapped for a
    # link to someone else's file since it was checked.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        path.unlink()
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
