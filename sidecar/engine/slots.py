"""Slots: where a model pool runs jobs. A slot runs up to `capacity` jobs at a time.

- `ProcessSlot`: a spawned worker process (the normal case), `parallel` jobs decoded
  together in one batch. A crash inside llama.cpp kills the worker, not the daemon;
  the pipe's EOF tells us.
- `ThreadSlot`: a LlamaRunner in a thread of the daemon, one job at a time, for
  debugging (`sidecar serve --in-process`) and profiling; no crash isolation.

Both report back on the event loop through `Events`; the pool does the scheduling.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from multiprocessing import reduction
from pathlib import Path
from typing import Any, Protocol

import psutil

from sidecar import logs
from sidecar.domain.errors import FailedPrecondition, SidecarError, WorkerCrashed, from_kind
from sidecar.domain.specs import ModelFacts, ModelFd, RunnerSpec
from sidecar.domain.status import SlotInfo
from sidecar.domain.types import Result, Task, TokenEvent
from sidecar.worker.entry import worker_main

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 5.0


class Events(Protocol):
    """Callbacks a slot makes on the event loop thread."""

    def token(self, slot: Slot, job_id: int, event: TokenEvent) -> None: ...
    def done(self, slot: Slot, job_id: int, result: Result) -> None: ...
    def failed(self, slot: Slot, job_id: int, error: SidecarError) -> None: ...
    def died(self, slot: Slot, exitcode: int | None, job_ids: set[int]) -> None:
        """The worker is gone (not by `stop`); `job_ids` is what it was running."""


class Slot(Protocol):
    spec: RunnerSpec
    info: SlotInfo
    facts: ModelFacts | None
    job_ids: set[int]  # running now; "busy" while not empty
    capacity: int  # jobs it takes at once

    started_at: float

    async def start(self) -> ModelFacts: ...
    def submit(self, job_id: int, task: Task, stream: bool) -> None: ...
    def cancel(self, job_id: int) -> None: ...
    async def stop(self) -> None: ...
    def ping(self) -> None: ...
    def unanswered_s(self, now: float) -> float: ...
    def kill(self) -> None: ...
    def rss(self) -> int | None: ...
    def suspend(self, on: bool) -> None:
        """Stop (True) or continue (False) the worker's computation where it stands."""


class Unsupervised:
    """Liveness hooks for slots that share the daemon's process: nothing to ping or kill."""

    started_at = 0.0

    def ping(self) -> None:
        pass

    def unanswered_s(self, now: float) -> float:
        return 0.0

    def kill(self) -> None:
        pass

    def rss(self) -> int | None:
        return None

    def suspend(self, on: bool) -> None:
        pass  # a thread of the daemon cannot be stopped from outside


ModelFdSource = Callable[[Path], "int | None"]


def _with_fd(spec: RunnerSpec, model_fd: ModelFdSource | None) -> RunnerSpec:
    """`spec` with the decrypted copy of a sealed blob to map (read in a thread: the
    first worker of a version decrypts it)."""
    fd = model_fd(spec.path) if model_fd is not None else None
    return replace(spec, model_fd=ModelFd(fd)) if fd is not None else spec


def _lora_fd(task: Task, adapter_fd: ModelFdSource | None) -> int | None:
    """A descriptor of the decrypted copy of `task`'s adapter when its blob is sealed
    (the caller owns it); None when there is no adapter or its blob is plaintext."""
    lora = getattr(task, "lora", None)
    if lora is None or adapter_fd is None:
        return None
    return adapter_fd(lora.path)


class ProcessSlot:
    def __init__(
        self,
        spec: RunnerSpec,
        events: Events,
        model_fd: ModelFdSource | None = None,
        adapter_fd: ModelFdSource | None = None,
    ) -> None:
        """`model_fd`: the store's `worker_fd` (sealed blobs are mapped from memory);
        `adapter_fd`: its `adapter_fd` (a sealed adapter reaches the worker as a descriptor
        of its decrypted copy, with the job that needs it)."""
        self.spec = spec
        self._model_fd = model_fd
        self._adapter_fd = adapter_fd
        self.events = events
        self.info = SlotInfo(None, "starting", 0)
        self.facts: ModelFacts | None = None
        self.job_ids: set[int] = set()
        self.capacity = spec.parallel
        self._proc: Any = None
        self._conn: Any = None
        self._outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._ping_n = 0
        self._ping_sent: float | None = None
        self.suspended = False
        self.started_at = time.monotonic()

    async def start(self) -> ModelFacts:
        self._loop = asyncio.get_running_loop()
        ctx = mp.get_context("spawn")  # never fork a process that holds gRPC threads
        parent, child = ctx.Pipe()
        self._conn = parent
        # The daemon's logging as it is now (a SIGHUP may have changed it since the spec).
        spec = replace(self.spec, log=logs.current())
        spec = await self._loop.run_in_executor(None, _with_fd, spec, self._model_fd)
        self._proc = ctx.Process(target=worker_main, args=(child, spec), daemon=True)
        await self._loop.run_in_executor(None, self._proc.start)
        child.close()
        self.info.pid = self._proc.pid
        msg = await self._loop.run_in_executor(None, self._first_message)
        if msg[0] != "ready":
            await self.stop()
            raise from_kind(msg[1], msg[2])
        self.facts = msg[1]
        self.info.state = "idle"
        self.started_at = time.monotonic()
        threading.Thread(target=self._read, name=f"slot-read-{self.info.pid}", daemon=True).start()
        threading.Thread(
            target=self._write, name=f"slot-write-{self.info.pid}", daemon=True
        ).start()
        return msg[1]  # type: ignore[no-any-return]

    def _first_message(self) -> tuple[Any, ...]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._conn.poll(0.1):
                try:
                    return self._conn.recv()  # type: ignore[no-any-return]
                except (EOFError, OSError):
                    break
            if not self._proc.is_alive():
                break
        code = self._proc.exitcode
        return (
            "fatal",
            FailedPrecondition.kind,
            f"worker for {self.spec.path} exited while loading (exit code {code})",
        )

    def submit(self, job_id: int, task: Task, stream: bool) -> None:
        self.job_ids.add(job_id)
        self.info.state = "busy"
        self.info.requests += 1
        self._outbox.put(("run", job_id, task, stream))

    def cancel(self, job_id: int) -> None:
        self._outbox.put(("cancel", job_id))

    # Liveness: the worker answers pings between decode steps and prompt blocks, from the
    # thread that runs llama.cpp, so one stuck in native code (or SIGSTOPped) goes quiet.
    def ping(self) -> None:
        if self._ping_sent is None and not self.suspended and self.info.state in ("idle", "busy"):
            self._ping_n += 1
            self._ping_sent = time.monotonic()
            self._outbox.put(("ping", self._ping_n))

    def unanswered_s(self, now: float) -> float:
        return 0.0 if self._ping_sent is None else now - self._ping_sent

    def kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()

    # SIGSTOP rather than a message: a stopped worker gives its core back at once, even in
    # the middle of a llama_decode, and nothing it computes changes (its replies stay
    # byte-identical). A message the worker obeyed between decode calls was tried first: a
    # SmolLM2 Classify row is two or three calls of 100-400 ms each, and the held worker
    # still burned about half its CPU beside the live job. Its silence while stopped is
    # ours, not a hang. A stopped worker cannot see the daemon die: it asks the kernel to
    # kill it when its parent goes (`entry`).
    def suspend(self, on: bool) -> None:
        if on == self.suspended or self.info.pid is None or self.info.state in ("dead", "stopped"):
            return
        try:
            os.kill(self.info.pid, signal.SIGSTOP if on else signal.SIGCONT)
        except ProcessLookupError:
            return  # it died; the reader reports that
        self.suspended = on
        self._ping_sent = None

    def rss(self) -> int | None:
        try:
            return int(psutil.Process(self.info.pid).memory_info().rss) if self.info.pid else None
        except psutil.Error:
            return None

    def _write(self) -> None:
        while (msg := self._outbox.get()) is not None:
            fd = None
            if msg[0] == "run":
                try:  # here, off the event loop: the first use of a version decrypts it
                    fd = _lora_fd(msg[2], self._adapter_fd)
                except SidecarError as e:
                    self._report(("error", msg[1], e.kind, e.message))
                    continue
                except OSError as e:  # e.g. out of descriptors: this job fails, not the writer
                    why = f"cannot hand the adapter to the worker: {e.strerror or e}"
                    self._report(("error", msg[1], FailedPrecondition.kind, why))
                    continue
            try:
                if fd is None:
                    self._conn.send(msg)
                else:  # the worker reads the descriptor right after this message
                    self._conn.send((*msg, "fd"))
                    reduction.send_handle(self._conn, fd, self.info.pid)
            except (OSError, ValueError):
                return  # the reader sees the death and reports it
            finally:
                if fd is not None:
                    os.close(fd)  # the worker has its own now (or is gone)

    def _report(self, msg: tuple[Any, ...]) -> None:
        self._post(self._deliver, msg)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run `fn` on the event loop (from the reader or writer thread)."""
        assert self._loop is not None
        # RuntimeError: the loop is closed, the daemon is shutting down and nobody waits.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            self._post(self._deliver, msg)
        self._post(self._died)

    def _deliver(self, msg: tuple[Any, ...]) -> None:
        op, job_id = msg[0], msg[1]
        if op == "pong":
            if job_id == self._ping_n:
                self._ping_sent = None
        elif op == "token":
            self.events.token(self, job_id, msg[2])
        elif op == "done":
            self._finish(job_id)
            self.events.done(self, job_id, msg[2])
        elif op == "error":
            self._finish(job_id)
            self.events.failed(self, job_id, from_kind(msg[2], msg[3]))

    def _finish(self, job_id: int) -> None:
        self.job_ids.discard(job_id)
        if not self.job_ids and self.info.state == "busy":
            self.info.state = "idle"

    def _died(self) -> None:
        if self.info.state in ("dead", "stopped"):
            return
        self.info.state = "stopped" if self._stopping else "dead"
        self._outbox.put(None)
        if self._proc is not None:
            self._proc.join(timeout=0.5)
        code = None if self._proc is None else self._proc.exitcode
        job_ids, self.job_ids = self.job_ids, set()
        if not self._stopping:
            self.events.died(self, code, job_ids)  # the pool decides whom to blame
            return
        for job_id in sorted(job_ids):  # stopped by us (drain timeout, shutdown): not theirs
            self.events.failed(
                self,
                job_id,
                WorkerCrashed(f"worker pid {self.info.pid} was stopped during the request: retry"),
            )

    async def stop(self) -> None:
        self._stopping = True
        self.suspend(False)  # a stopped process reads no "stop"
        self._outbox.put(("stop",))
        self._outbox.put(None)
        if self._proc is not None and self._proc.pid is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._join)
        if self.info.state != "dead":
            self.info.state = "stopped"

    def _join(self) -> None:
        self._proc.join(STOP_TIMEOUT_S)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(STOP_TIMEOUT_S)
        with contextlib.suppress(OSError):
            self._conn.close()


class ThreadSlot(Unsupervised):
    """In-process slot: the runner lives in one dedicated thread."""

    def __init__(
        self,
        spec: RunnerSpec,
        events: Events,
        model_fd: ModelFdSource | None = None,
        adapter_fd: ModelFdSource | None = None,
    ) -> None:
        self.spec = spec
        self._model_fd = model_fd
        self._adapter_fd = adapter_fd
        self.events = events
        self.info = SlotInfo(None, "starting", 0)
        self.facts: ModelFacts | None = None
        self.job_ids: set[int] = set()
        self.capacity = 1
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runner")
        self._runner: Any = None
        self._cancel = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> ModelFacts:
        from sidecar.worker.runner import LlamaRunner

        self._loop = asyncio.get_running_loop()
        spec = await self._loop.run_in_executor(self._pool, _with_fd, self.spec, self._model_fd)
        self._runner = await self._loop.run_in_executor(self._pool, LlamaRunner, spec)
        self.facts = self._runner.facts
        self.info.state = "idle"
        return self._runner.facts  # type: ignore[no-any-return]

    def submit(self, job_id: int, task: Task, stream: bool) -> None:
        assert self._loop is not None
        loop = self._loop
        self.job_ids = {job_id}
        self.info.state = "busy"
        self.info.requests += 1
        self._cancel.clear()

        def emit(event: TokenEvent) -> None:
            loop.call_soon_threadsafe(self.events.token, self, job_id, event)

        def work() -> None:
            from sidecar.worker.runner import Stopped

            try:
                fd = _lora_fd(task, self._adapter_fd)
                if fd is not None:
                    self._runner.batch.loras.offer(task.lora.sha256, fd)  # type: ignore[union-attr]
                result = self._runner.run(task, emit if stream else None, self._cancel.is_set)
                loop.call_soon_threadsafe(self._settle, job_id, result, None)
            except Stopped:
                loop.call_soon_threadsafe(
                    self._settle, job_id, None, from_kind("cancelled", "cancelled by the caller")
                )
            except SidecarError as e:
                loop.call_soon_threadsafe(self._settle, job_id, None, e)
            except Exception as e:
                loop.call_soon_threadsafe(
                    self._settle, job_id, None, from_kind("internal", repr(e))
                )
            finally:  # one job at a time: a copy it did not load (cached) is not needed
                self._runner.batch.loras.drop_offers()

        self._pool.submit(work)

    def _settle(self, job_id: int, result: Result | None, error: SidecarError | None) -> None:
        self.job_ids.discard(job_id)
        self.info.state = "idle"
        if error is not None:
            self.events.failed(self, job_id, error)
        else:
            assert result is not None
            self.events.done(self, job_id, result)

    def cancel(self, job_id: int) -> None:
        if job_id in self.job_ids:
            self._cancel.set()

    async def stop(self) -> None:
        self._cancel.set()
        if self._runner is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._runner.close)
        self._pool.shutdown(wait=False)
        self.info.state = "stopped"


SlotFactory = Callable[[RunnerSpec, Events], Slot]
