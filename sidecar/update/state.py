"""What the updater knows about each model: on disk what must survive a restart (`State`,
`<store>/updates/<name>/state.json`), in memory the one update in flight (`Job`)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sidecar.fileio import write_atomic
from sidecar.update import fetch

log = logging.getLogger("sidecar.update")


@dataclass(frozen=True)
class Offered:
    """The version the newest manifest read offers, and the share of daemons it is for."""

    version: int
    fraction: float


def aware_time(value: object) -> datetime | None:
    """`value` as a time with a zone (None if it is not one): only those compare safely
    with a manifest's `created`."""
    if not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo is not None else None


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _text(v: object) -> bool:
    return isinstance(v, str)


def _offered(v: object) -> bool:
    if v == {}:
        return True
    if not isinstance(v, dict) or set(v) != {"version", "fraction"}:
        return False
    f = v["fraction"]
    number = isinstance(f, (int, float)) and not isinstance(f, bool)
    return _count(v["version"]) and number and math.isfinite(f) and 0 <= f <= 1


# What each field must hold: a damaged file (or one edited by hand) resets that field alone,
# and never breaks the readers (status, metrics, the update sequence).
_VALID: dict[str, Callable[[Any], bool]] = {
    "highest_version": _count,
    "highest_created": lambda v: v == "" or aware_time(v) is not None,
    "rollout": _offered,
    "installed_version": _count,
    "failed": lambda v: (
        isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())
    ),
    "bad_deltas": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "pending_override": lambda v: isinstance(v, bool),
    "probation": lambda v: isinstance(v, dict),
}


@dataclass
class State:
    """What must survive a restart, per model."""

    highest_version: int = 0  # the newest version a verified manifest ever named
    highest_created: str = ""  # that manifest's `created`: an earlier copy is a replay
    rollout: dict[str, Any] = field(default_factory=dict)  # the last manifest's version, fraction
    last_rollback: str = ""  # the last version probation rolled back, when and why
    installed_version: int = 0
    installed_sha256: str = ""
    failed: dict[str, str] = field(default_factory=dict)  # full-file sha256 -> why
    bad_deltas: list[str] = field(default_factory=list)  # delta sha256s that did not apply
    pending: str = ""  # target sha256 of an install in progress (resumed at start)
    # It was started by an operator's --ignore-rollout: its resume keeps going outside the
    # cohort, rather than leaving a partial download behind for ever.
    pending_override: bool = False
    probation: dict[str, Any] = field(default_factory=dict)
    last: str = ""

    @classmethod
    def load(cls, path: Path) -> State:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except ValueError as e:
            # A damaged state file must not stop updates; what it guarded is re-learned.
            log.warning("update state %s unreadable (%s): starting afresh", path, e)
            return cls()
        if not isinstance(raw, dict):
            log.warning("update state %s is not an object: starting afresh", path)
            return cls()
        fields = {}
        for key in cls.__dataclass_fields__:
            if key not in raw:
                continue
            value = raw[key]
            if _VALID.get(key, _text)(value):
                fields[key] = value
            else:
                log.warning("update state %s: %s is damaged (%.80r): reset", path, key, value)
        return cls(**fields)

    def offered(self) -> Offered | None:
        r = self.rollout
        return Offered(int(r["version"]), float(r["fraction"])) if r else None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(asdict(self), indent=1, sort_keys=True).encode())


@dataclass
class Job:
    """The one update of a model in flight: what status shows, what `abandon` stops."""

    owner: object = None  # whoever asked (an RPC); only they may abandon it
    stage: str = "checking"
    control: fetch.Control = field(default_factory=fetch.Control)
    cancellable: bool = True  # until install: half an install helps nobody
    started: float = field(default_factory=time.monotonic)

    def describe(self) -> str:
        c, now = self.control, time.monotonic()
        text = f"{self.stage} {c.what or ''}".rstrip()
        if c.total:
            text += f": {c.done} of {c.total} bytes"
        text += f", {now - self.started:.0f}s old"
        if self.stage in ("checking", "fetching"):
            text += f", last byte {now - c.last_byte:.0f}s ago"
            if c.deadline is not None:
                text += f", deadline in {max(c.deadline - now, 0):.0f}s"
        return text
