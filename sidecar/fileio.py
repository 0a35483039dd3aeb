"""File helpers every part that writes or checks a file shares.

A write that must survive `kill -9` is atomic: a `*.partial` file, fsync, `os.replace`,
fsync of the directory, so a reader finds either the old bytes or the new, never half.
A copy is a new inode of our own (a reflink where the filesystem offers one, else a
byte copy), never a hardlink: whoever writes a shared inode rewrites every name of it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20
FICLONE = 0x40049409  # linux/fs.h _IOW(0x94, 9, int): share extents copy-on-write


def sha256_file(path: Path, chunk: int = CHUNK) -> str:
    """The sha256 of a file, read `chunk` bytes at a time (a model is gigabytes)."""
    with path.open("rb") as f:
        return sha256_stream(f, chunk)


def sha256_stream(f: BinaryIO, chunk: int = CHUNK) -> str:
    """The sha256 of what is left to read in `f` (a decrypting reader included)."""
    h = hashlib.sha256()
    while block := f.read(chunk):
        h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def clone_or_copy(src: Path, dst: Path, mode: int = 0o600) -> str | None:
    """Write `dst` (which must not exist) with the bytes of `src` in a new inode of our own:
    a reflink where the filesystem offers one (btrfs, xfs: instant, copy-on-write), else a
    copy. Never a hardlink. `dst` is fsynced. Returns the sha256 of what a copy wrote
    (hashed on the way, saving a second read), None after a reflink."""
    with src.open("rb") as fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as fout:
            try:
                fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
                sha = None
            except OSError:  # EOPNOTSUPP, EXDEV, EINVAL, ENOTTY...: no reflink here
                h = hashlib.sha256()
                while chunk := fin.read(CHUNK):
                    h.update(chunk)
                    fout.write(chunk)
                sha = h.hexdigest()
            fout.flush()
            os.fsync(fout.fileno())
    return sha
