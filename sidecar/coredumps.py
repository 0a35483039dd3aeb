"""No core dumps from a process that holds a decrypted model.

An encrypted store promises that a model's plaintext never reaches disk, and a core dump is
a file on disk: a crashing worker (what crash-isolated workers exist for) would otherwise
leave the whole mapped model in `core` or with a dump handler (systemd-coredump, apport).
Setting RLIMIT_CORE to 0 stops the kernel's core file and the handlers that honour it;
a coredump_filter of 0 leaves no memory in a dump a handler takes anyway.

Not prctl(PR_SET_DUMPABLE, 0): that would also hide the worker's /proc/PID/maps from the
daemon, which reads them to know which versions are in use (gc, swaps).
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path


def forbid() -> None:
    """No core dump of this process from now on (idempotent; for good: it holds plaintext)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError):  # not Linux, or a /proc without it: the limit stays
        Path("/proc/self/coredump_filter").write_text("0")
