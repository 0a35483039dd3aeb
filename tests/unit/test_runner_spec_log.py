"""A worker started from a bare RunnerSpec logs as the daemon's default does: the spec's
`log` is in `logs.current()`'s (level, format) order, which the worker passes on as is."""

from __future__ import annotations

import dataclasses
import io
import logging

from sidecar import logs
from sidecar.domain.specs import RunnerSpec


def test_the_default_log_is_level_then_format_as_current_gives_it() -> None:
    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    try:
        logs.configure("info", "text", io.StringIO(), keep_recent=False)
        default = next(f for f in dataclasses.fields(RunnerSpec) if f.name == "log").default
        assert default == logs.current() == ("info", "text")
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
