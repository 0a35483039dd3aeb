"""What the updater knows about each model: on disk what must survive a restart (`State`,
`<store>/updates/<name>/state.json`), in memory the one update in flight (`Job`)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sidecar.fileio import write_atomic
from sidecar.update import fetch

log = logging.getLogger("sidecar.update")


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
    probation: dict[str, Any] = field(default_factory=dict)
    last: str = ""

    @classmethod
    def load(cls, path: Path) -> State:
        try:
            raw = json.loads(path.read_text())
            return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})
        except FileNotFoundError:
            return cls()
        except (ValueError, TypeError) as e:
            # A damaged state file must not stop updates; what it guarded is re-learned.
            log.warning("update state %s unreadable (%s): starting afresh", path, e)
            return cls()

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
