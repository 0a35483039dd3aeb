"""The entry point of a spawned worker process: one LlamaRunner behind a pipe.

Messages in (tuples): ("run", job_id, task, stream) | ("cancel", job_id) | ("ping", n) | ("stop",)
Messages out:         ("ready", facts, pid) | ("fatal", kind, message)
                      ("token", job_id, TokenEvent) | ("done", job_id, result)
                      ("error", job_id, kind, message) | ("pong", n)

The worker runs one job at a time. While decoding it polls the pipe between
tokens, so a cancel (client gone, deadline passed) frees it within a token.
Whatever it prints natively becomes log records in the daemon's format (`native_log`).
"""

from __future__ import annotations

import os
import signal
import traceback
from multiprocessing.connection import Connection

from sidecar.domain.errors import FailedPrecondition, SidecarError
from sidecar.domain.specs import RunnerSpec
from sidecar.domain.types import Task, TokenEvent
from sidecar.worker import native_log
from sidecar.worker.runner import LlamaRunner, Stopped


def worker_main(conn: Connection, spec: RunnerSpec) -> None:
    # The daemon owns signal handling; a Ctrl-C in the terminal must not kill
    # workers mid-request before the daemon has drained them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    native_log.capture(*spec.log)
    try:
        runner = LlamaRunner(spec)
    except SidecarError as e:
        conn.send(("fatal", e.kind, e.message))
        return
    except Exception as e:
        conn.send(("fatal", FailedPrecondition.kind, f"cannot load model {spec.path}: {e}"))
        return
    conn.send(("ready", runner.facts, os.getpid()))
    try:
        _serve(conn, runner)
    finally:
        runner.close()


def _serve(conn: Connection, runner: LlamaRunner) -> None:
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the daemon is gone
        op = msg[0]
        if op == "run":
            if not _run(conn, runner, msg[1], msg[2], msg[3]):
                return
        elif op == "ping":
            conn.send(("pong", msg[1]))
        elif op == "stop":
            return
        # a "cancel" for a job that already finished needs nothing


def _run(conn: Connection, runner: LlamaRunner, job_id: int, task: Task, stream: bool) -> bool:
    """Run one job; False when the daemon asked us to stop meanwhile."""
    state = {"cancelled": False, "stop": False}

    def should_stop() -> bool:
        while conn.poll():
            m = conn.recv()
            if m[0] == "cancel" and m[1] == job_id:
                state["cancelled"] = True
            elif m[0] == "ping":
                conn.send(("pong", m[1]))
            elif m[0] == "stop":
                state["cancelled"] = state["stop"] = True
        return state["cancelled"]

    def emit(event: TokenEvent) -> None:
        conn.send(("token", job_id, event))

    try:
        result = runner.run(task, emit if stream else None, should_stop)
        conn.send(("done", job_id, result))
    except Stopped:
        conn.send(("error", job_id, "cancelled", "cancelled by the caller"))
    except SidecarError as e:
        conn.send(("error", job_id, e.kind, e.message))
    except Exception:
        conn.send(("error", job_id, "internal", traceback.format_exc()))
    return not state["stop"]
