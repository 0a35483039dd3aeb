"""The spawn target of a worker process, importable without llama.cpp.

multiprocessing pickles a Process target by reference (module and name), so the daemon must
import the module that holds it. This one is light: llama.cpp (1.2 s of import, and native
state) is loaded only in the child, when the target runs.
"""

from __future__ import annotations

from multiprocessing.connection import Connection

from sidecar.domain.specs import RunnerSpec


def worker_main(conn: Connection, spec: RunnerSpec) -> None:
    _die_with_parent()
    from sidecar.worker.process import worker_main as run

    run(conn, spec)


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Have the kernel SIGKILL this worker when the daemon's thread that started it ends.

    A worker the daemon holds with SIGSTOP (background work beside live work, see the pool)
    cannot notice the daemon die by its pipe's EOF; without this it would stay behind,
    stopped, holding its memory. The starting thread is one of the event loop's executor
    threads, which live until the loop closes, after the workers are stopped. Linux only;
    elsewhere a held worker is continued before every stop, and a killed daemon may leave
    one behind."""
    import sys

    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import multiprocessing
    import os
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)  # the daemon died before the request above was made
