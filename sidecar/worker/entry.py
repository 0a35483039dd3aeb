"""The spawn target of a worker process, importable without llama.cpp.

multiprocessing pickles a Process target by reference (module and name), so the daemon must
import the module that holds it. This one is light: llama.cpp (1.2 s of import, and native
state) is loaded only in the child, when the target runs.
"""

from __future__ import annotations

from multiprocessing.connection import Connection

from sidecar.domain.specs import RunnerSpec


def worker_main(conn: Connection, spec: RunnerSpec) -> None:
    from sidecar.worker.process import worker_main as run

    run(conn, spec)
