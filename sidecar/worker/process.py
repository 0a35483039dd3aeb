"""The entry point of a spawned worker process: one LlamaRunner behind a pipe.

Messages in (tuples): ("run", job_id, task, stream) | ("cancel", job_id) | ("ping", n) | ("stop",)
                      ("run", job_id, task, stream, "fd"), then a descriptor (SCM_RIGHTS):
                      the decrypted copy of the task's sealed adapter blob
Messages out:         ("ready", facts, pid) | ("fatal", kind, message)
                      ("token", job_id, TokenEvent) | ("done", job_id, result)
                      ("error", job_id, kind, message) | ("pong", n)

The worker holds up to `parallel` jobs (the daemon never sends more). Generations run
together in the runner's batch, one decode step at a time; Classify and Embed run whole,
between steps (Embed jobs that wait together in one call). Between steps (and between the prompt blocks of a whole job) it reads the
pipe: pings are answered there, from the thread that runs llama.cpp, so a worker stuck
in native code goes quiet; a cancel frees its sequence before the next step.
Whatever it prints natively becomes log records in the daemon's format (`native_log`).
"""

from __future__ import annotations

import os
import signal
import traceback
from collections import deque
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

from sidecar import coredumps
from sidecar.domain.errors import FailedPrecondition, SidecarError
from sidecar.domain.specs import RunnerSpec
from sidecar.domain.types import EmbedTask, Result, TokenEvent
from sidecar.worker import native_log
from sidecar.worker.runner import LlamaRunner, NeedsRoom, Stopped


def worker_main(conn: Connection, spec: RunnerSpec) -> None:
    # The daemon owns signal handling; a Ctrl-C in the terminal must not kill
    # workers mid-request before the daemon has drained them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if spec.model_fd is not None:  # a decrypted model: a crash must not write it to disk
        coredumps.forbid()
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
        _Worker(conn, runner).serve()
    finally:
        runner.close()


class _Worker:
    def __init__(self, conn: Connection, runner: LlamaRunner) -> None:
        self.conn = conn
        self.runner = runner
        self.inbox: deque[tuple[Any, ...]] = deque()  # read while a whole job ran
        # Whole jobs waiting for the batch to drain (their worst case did not fit beside it).
        self.deferred: deque[tuple[Any, ...]] = deque()
        self.cancelled: set[int] = set()  # jobs not in the batch: running whole, or queued
        self.whole: int | None = None  # the whole job running
        self.stopping = False

    def serve(self) -> None:
        batch = self.runner.batch
        while not self.stopping:
            if self.deferred and not batch.active:  # drained: their turn, first
                self.inbox.extendleft(reversed(self.deferred))
                self.deferred.clear()
            if not batch.busy and not self.inbox:
                batch.loras.drop_offers()  # no job left that could load them
                try:
                    self.conn.poll(None)  # idle: sleep until the daemon speaks
                except (EOFError, OSError):
                    return
            if not self._read():
                return  # the daemon is gone
            self._embed_together()
            while self.inbox and not self.stopping:
                self._handle(self.inbox.popleft())
            if self.stopping:
                break
            batch.hold = bool(self.deferred)  # admit nothing new until the batch drains
            for seq, outcome in batch.step():
                self._report(seq.key, outcome)
        for s in [*batch.active, *batch.waiting]:
            self._report(s.key, None)

    def _read(self) -> bool:
        """Move what the pipe holds to the inbox, answering pings at once."""
        try:
            while self.conn.poll():
                msg = self.conn.recv()
                if msg[0] == "ping":
                    self.conn.send(("pong", msg[1]))
                elif msg[0] == "cancel":
                    job_id = msg[1]
                    queued = (*self.inbox, *self.deferred)
                    if job_id == self.whole or any(m[1] == job_id for m in queued):
                        self.cancelled.add(job_id)
                    self.runner.batch.cancel(job_id)
                elif msg[0] == "stop":
                    self.stopping = True
                else:
                    if msg[0] == "run" and len(msg) > 4:
                        # Right behind its message on the pipe: read before anything else is.
                        fd = reduction.recv_handle(self.conn)
                        os.set_inheritable(fd, False)
                        self.runner.batch.loras.offer(msg[2].lora.sha256, fd)
                    self.inbox.append(msg)
        except (EOFError, OSError):
            return False
        return True

    def _handle(self, msg: tuple[Any, ...]) -> None:
        if msg[0] != "run":
            return
        job_id, task, stream = msg[1], msg[2], msg[3]
        if job_id in self.cancelled:
            self.cancelled.discard(job_id)
            self._report(job_id, None)
            return

        def emit(event: TokenEvent) -> None:
            self.conn.send(("token", job_id, event))

        try:
            seq = self.runner.sequence(job_id, task, emit if stream else None)
            if seq is not None:
                self.runner.batch.add(seq)
                return
            self.whole = job_id
            try:
                result = self.runner.run_whole(task, lambda: self._stop_whole(job_id))
            finally:
                self.whole = None
                self.cancelled.discard(job_id)
            self._report(job_id, result)
        except NeedsRoom:
            self.deferred.append(msg)
        except Stopped:
            self._report(job_id, None)
        except SidecarError as e:
            self._report(job_id, e)
        except Exception:
            self.conn.send(("error", job_id, "internal", traceback.format_exc()))

    def _embed_together(self) -> None:
        """Embed jobs that wait together are decoded together: their texts share decodes
        (a text's vector is the same alone or beside others, see `embed`)."""
        jobs = [
            m
            for m in self.inbox
            if m[0] == "run" and isinstance(m[2], EmbedTask) and m[1] not in self.cancelled
        ]
        if len(jobs) < 2:
            return
        for m in jobs:
            self.inbox.remove(m)
        results: list[Result | SidecarError]
        try:
            results = list(self.runner.embed_many([m[2] for m in jobs]))
        except SidecarError as e:
            results = [e] * len(jobs)
        except Exception:
            for m in jobs:
                self.conn.send(("error", m[1], "internal", traceback.format_exc()))
            return
        for m, result in zip(jobs, results, strict=True):
            self._report(m[1], result)

    def _stop_whole(self, job_id: int) -> bool:
        self._read()
        return job_id in self.cancelled or self.stopping

    def _report(self, job_id: int, outcome: Result | SidecarError | None) -> None:
        if outcome is None:
            self.conn.send(("error", job_id, "cancelled", "cancelled by the caller"))
        elif isinstance(outcome, SidecarError):
            self.conn.send(("error", job_id, outcome.kind, outcome.message))
        else:
            self.conn.send(("done", job_id, outcome))
