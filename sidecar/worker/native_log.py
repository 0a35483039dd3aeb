"""A worker's native output as log records, formatted as the daemon formats its own.

A worker shares the daemon's stderr, and llama.cpp writes its log there: under
`log.format = "json"` raw lines (`llama_kv_cache_iswa: ...`) would break every reader of
the log. So a worker, before it loads anything:

- takes llama.cpp's log through `llama_log_set` at its real level. llama-cpp-python's own
  callback reads the levels of an older ggml (it prints warnings as errors and drops
  errors); here errors are ERROR records and the rest (debug, info and warnings about
  llama.cpp's internals: cache layout, context sizes, pooling) DEBUG records;
- points its fds 1 and 2 at a pipe read by a small forked process that makes each line a
  WARNING record (ggml's assertion messages, a Python traceback). A process, not a thread:
  a native abort kills every thread of the worker at once, and its last words are the
  lines that matter. The reader still gets them, then end of file, and exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
from typing import Any

import llama_cpp

from sidecar import logs

native = logging.getLogger("sidecar.worker.llama")
raw = logging.getLogger("sidecar.worker.output")

# ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the last).
_LEVELS = {4: logging.ERROR}
_CONT = 5
_installed: list[Any] = []


class _LlamaLog:
    """Whole lines of llama.cpp's log, each one record (it sends lines in pieces)."""

    def __init__(self) -> None:
        self.level = logging.DEBUG
        self.partial = ""
        self.extra = {"request": {"worker": os.getpid()}}  # a field of JSON records

    def __call__(self, level: int, text: bytes, _user: Any) -> None:
        try:  # never raise into C
            if level != _CONT:
                self.flush()
                self.level = _LEVELS.get(level, logging.DEBUG)
            *lines, self.partial = (self.partial + text.decode("utf-8", "replace")).split("\n")
            for line in lines:
                self._emit(line)
        except Exception:  # a log line is not worth a crash in native code
            pass

    def flush(self) -> None:
        line, self.partial = self.partial, ""
        self._emit(line)

    def _emit(self, line: str) -> None:
        if line.strip() and native.isEnabledFor(self.level):
            native.log(self.level, "%s", line.rstrip(), extra=self.extra)


def capture(level: str, fmt: str) -> None:
    """Set up this worker's logging and take over its native output, once per process."""
    stderr = os.dup(2)
    logs.configure(
        level, fmt, os.fdopen(stderr, "w", buffering=1, errors="replace"), keep_recent=False
    )
    worker = os.getpid()
    read_end, write_end = os.pipe()
    if os.fork() == 0:
        try:
            os.close(write_end)
            _close_all_but(read_end, stderr)
            _relay(read_end, worker)
        finally:
            os._exit(0)
    os.close(read_end)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
    # llama.cpp keeps the pointer for the life of the process: so must Python.
    _installed.append(llama_cpp.llama_log_callback(_LlamaLog()))
    llama_cpp.llama_log_set(_installed[-1], ctypes.c_void_p(0))


def _relay(fd: int, worker: int) -> None:
    with os.fdopen(fd, "rb") as pipe:
        for line in pipe:
            text = line.decode("utf-8", "replace").rstrip()
            if text.strip():
                raw.warning("worker %d wrote: %s", worker, text)


def _close_all_but(*keep: int) -> None:
    """The reader holds nothing of the worker's: above all not its pipe to the daemon, whose
    end of file is how the daemon learns the worker died."""
    start = 3
    for fd in sorted(keep):
        if fd >= start:
            os.closerange(start, fd)
            start = fd + 1
    with contextlib.suppress(ValueError):
        os.closerange(start, os.sysconf("SC_OPEN_MAX"))
