"""Which files a worker really has mapped or open: what the store must not delete.

The pool knows which file each worker was started on, but a worker keeps its mapping
until it has exited (a draining one included), whatever the pool now believes, so on
Linux the kernel's own account is read: /proc/PID/maps (what is mapped) and
/proc/PID/fd (what is open; a worker opens its model before it maps it). Elsewhere,
or where /proc hides other processes, callers fall back to the file a worker was
started on.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

_DELETED = " (deleted)"


def open_files(pid: int) -> set[Path] | None:
    """The files process `pid` maps or has open; an empty set once it is gone, None when
    this system cannot say (no /proc, or not allowed to read it)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError as e:
        return set() if e.errno in (errno.ENOENT, errno.ESRCH) and _have_proc() else None
    files = set()
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        if len(fields) == 6 and fields[5].startswith("/"):
            files.add(Path(fields[5].removesuffix(_DELETED)))
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        fds = []  # exited since, or not ours to list: the mappings still tell
    for fd in fds:
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.startswith("/"):
            files.add(Path(target.removesuffix(_DELETED)))
    return files


def _have_proc() -> bool:
    return os.path.exists("/proc/self/maps")
