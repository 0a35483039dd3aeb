"""Logging set-up: plain text for people, JSON lines for machines (log.format).

Log messages carry what callers sent (model names, paths, error details), so both
formats make one record one line whatever it holds: the text format escapes control
characters (a newline in a model name cannot forge a second log line), and both cut a
message or field past `MAX_FIELD` characters (a 1 MB name is not logged whole).
Tracebacks, which are ours, keep their lines.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import IO

MAX_FIELD = 2000  # characters of one message or field; the rest is counted, not written

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


def configure(level: str, fmt: str, stream: IO[str] | None = None) -> None:
    """Log at `level` in format `fmt` ("text" or "json") to `stream` (default stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def current() -> tuple[str, str]:
    """This process's (level, format), for a worker process to log as the daemon does."""
    root = logging.getLogger()
    json_ = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    return logging.getLevelName(root.level).lower(), "json" if json_ else "text"
