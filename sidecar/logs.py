"""Logging set-up: plain text for people, JSON lines for machines (log.format).

Log messages carry what callers sent (model names, paths, error details), so both
formats make one record one line whatever it holds: the text format escapes control
characters (a newline in a model name cannot forge a second log line), and both cut a
message or field past `MAX_FIELD` characters (a 1 MB name is not logged whole).
Tracebacks, which are ours, keep their lines.

`Recent` keeps the last `RECENT_LINES` formatted records in memory, for `sidecar logs`
(through the daemon, so it works alike under systemd, launchd or a terminal): bounded
whatever the log rate, and a follower that falls behind is told how many lines it lost
instead of holding the log up.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import re
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import IO

MAX_FIELD = 2000  # characters of one message or field; the rest is counted, not written
RECENT_LINES = 1000  # lines `sidecar logs` can show (a few MB at most: MAX_FIELD bounds a line)

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def clip(text: str, limit: int = MAX_FIELD) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text) - limit} more characters)"


def one_line(text: str, limit: int = MAX_FIELD) -> str:
    """`text` safe to put on a log line: cut to `limit`, control characters escaped."""
    return _CONTROL.sub(_escape, clip(text, limit))


class TextFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": clip(record.getMessage()),
        }
        request = getattr(record, "request", None)
        if isinstance(request, dict):
            line.update({k: clip(v) if isinstance(v, str) else v for k, v in request.items()})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(
    level: str, fmt: str, stream: IO[str] | None = None, *, keep_recent: bool = True
) -> None:
    """Log at `level` in format `fmt` ("text" or "json") to `stream` (default stderr);
    `keep_recent` also keeps the last lines for `sidecar logs` (the daemon; not a worker,
    whose lines nothing would read)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    # The recent lines survive a re-configure (the same buffer, the new format).
    handlers: list[logging.Handler] = [handler]
    if keep_recent:
        recent = next((h for h in root.handlers if isinstance(h, Recent)), None) or Recent()
        recent.setFormatter(handler.formatter)
        handlers.append(recent)
    root.handlers[:] = handlers
    root.setLevel(level.upper())


def current() -> tuple[str, str]:
    """This process's (level, format), for a worker process to log as the daemon does."""
    root = logging.getLogger()
    json_ = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    return logging.getLevelName(root.level).lower(), "json" if json_ else "text"


class Recent(logging.Handler):
    """The last `size` records, formatted as the daemon's log formats them.

    `emit` runs on whatever thread logged; followers (`follow`) are asyncio tasks, woken
    through their loop. Each line has a sequence number, so a follower knows which lines it
    has and how many fell out of the buffer before it read them."""

    def __init__(self, size: int = RECENT_LINES) -> None:
        super().__init__()
        self.size = size
        self._lines: collections.deque[tuple[int, str]] = collections.deque(maxlen=size)
        self._next = 0  # the sequence number of the next line
        self._mutex = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)  # logging's own rule: report on stderr, never raise
            return
        with self._mutex:
            self._lines.append((self._next, text))
            self._next += 1
            waiters = list(self._waiters)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: its follower is gone
                loop.call_soon_threadsafe(event.set)

    def since(self, seq: int) -> tuple[list[str], int, int]:
        """(lines numbered `seq` and later, how many of those fell out, the next number)."""
        with self._mutex:
            first = self._lines[0][0] if self._lines else self._next
            lines = [text for n, text in self._lines if n >= seq]
            return lines, max(first - seq, 0), self._next

    def tail(self, lines: int) -> tuple[list[str], int]:
        """The last `lines` lines (0 = all kept), and the number of the next line."""
        with self._mutex:
            kept = [text for _, text in self._lines]
            return (kept[-lines:] if lines else kept), self._next

    async def follow(self, lines: int) -> AsyncIterator[tuple[str, int]]:
        """The last `lines` lines, then every new one as it comes, as (text, dropped):
        `dropped` counts the lines this follower lost just before this one."""
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        with self._mutex:
            self._waiters.add(waiter)
        try:
            start, seq = self.tail(lines)
            for text in start:
                yield text, 0
            while True:
                await event.wait()
                event.clear()
                new, dropped, seq = self.since(seq)
                for i, text in enumerate(new):
                    yield text, dropped if i == 0 else 0
        finally:
            with self._mutex:
                self._waiters.discard(waiter)


def recent() -> Recent | None:
    """This process's recent-lines buffer (set up by `configure`), if it has one."""
    return next((h for h in logging.getLogger().handlers if isinstance(h, Recent)), None)
