"""Escalation thresholds fitted from an eval (`sidecar eval --fit-threshold`), kept in
`<store>/router/thresholds.json` beside the budget: state the daemon reads, not config.

Why a state file and not the user's TOML: a fitted value is a measurement (of one model
version, on one held-out set, on one day), not a choice; rewriting a hand-written TOML
would lose its comments and layout, and a config file may be read-only or managed
(/etc, a .deb conffile). The file says where each value came from, and the config keeps
the value a person chose, which applies again when the entry is removed.

One entry per key: `task:NAME` (Classify by a config task: the task's own confidence),
`classify:MODEL` (Classify by labels alone on that model) and `extract:MODEL` (Extract's
mean token log-probability on that model: Extract has no task, and what a log-probability
is worth depends on the model). The file is written atomically by the CLI and read by the
daemon at start, on SIGHUP and when its mtime changes (checked at most once a second on
the request path, so a fit applies within a second without a signal).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from sidecar.fileio import write_atomic

log = logging.getLogger("sidecar.router")

FILE = "thresholds.json"
VERSION = 1
CHECK_EVERY_S = 1.0


@dataclass(frozen=True)
class Fitted:
    """One fitted threshold and what it was fitted on."""

    threshold: float  # keep local when the confidence is at least this
    target_accuracy: float  # the accuracy asked for
    accuracy: float  # of the rows kept local at the threshold, on the eval set
    kept_local: float  # their share
    rows: int  # local answers it was fitted on
    model: str = ""  # name@version that answered the eval
    source: str = ""  # the eval set
    fitted_at: str = ""  # UTC, ISO 8601

    def describe(self, key: str) -> str:
        day = self.fitted_at[:10]
        return (
            f"fitted ({key}: target accuracy {self.target_accuracy:g} on {self.rows} rows"
            f"{' of ' + self.model if self.model else ''}{', ' + day if day else ''})"
        )


def key(kind: str, *, task: str = "", model: str = "") -> str:
    """The entry a reply's threshold is looked up under."""
    return f"task:{task}" if task else f"{kind}:{model}"


def read(path: Path) -> dict[str, Fitted]:
    """The file's entries; {} when there is none. Raises ValueError for a damaged file."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {e}") from None
    entries = doc.get("thresholds") if isinstance(doc, dict) else None
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: no 'thresholds' object")
    out = {}
    for k, v in entries.items():
        try:
            out[k] = Fitted(**v)
        except TypeError as e:
            raise ValueError(f"{path}: entry {k!r}: {e}") from None
        if not isinstance(out[k].threshold, int | float):
            raise ValueError(f"{path}: entry {k!r}: threshold is not a number")
    return out


def save(path: Path, name: str, entry: Fitted) -> None:
    """Add or replace one entry, keeping the others (atomically: a reader sees the old
    file or the new one). A damaged file is replaced rather than blocking a new fit."""
    try:
        entries = read(path)
    except ValueError as e:
        log.warning("replacing a damaged thresholds file: %s", e)
        entries = {}
    entries[name] = entry
    doc = {"version": VERSION, "thresholds": {k: asdict(v) for k, v in sorted(entries.items())}}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode())


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class FittedThresholds:
    """The daemon's view of the file: re-read when it changes, at most once a second."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._entries: dict[str, Fitted] = {}
        self._stamp: tuple[int, int] | None = None  # (mtime_ns, size) last read
        self._checked = float("-inf")
        self.error = ""  # why the file was not read, for status
        self.reload()

    def reload(self) -> None:
        """Read the file if it changed (at start and on SIGHUP, and from `get`)."""
        self._checked = self._clock()
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        except OSError as e:
            self.error = f"{self.path}: {e.strerror or e}"
            return
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._entries = read(self.path)
            self.error = ""
        except ValueError as e:
            # The config's thresholds apply until the file is fixed or refitted.
            self._entries, self.error = {}, str(e)
            log.error("fitted thresholds ignored: %s", e)
            return
        log.info("fitted thresholds: %d from %s", len(self._entries), self.path)

    def get(self, name: str) -> Fitted | None:
        if self._clock() - self._checked >= CHECK_EVERY_S:
            self.reload()
        return self._entries.get(name)

    @property
    def entries(self) -> Mapping[str, Fitted]:
        return self._entries

    def report(self) -> dict[str, str]:
        """Key -> what applies, for `sidecar status`."""
        out = {k: f"{v.threshold:g} {v.describe(k)}" for k, v in sorted(self._entries.items())}
        if self.error:
            out["(error)"] = f"ignored: {self.error}"
        return out
