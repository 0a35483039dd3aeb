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
is worth depends on the model). The file is written atomically by the CLI (under a lock,
so two fits at once keep both entries) and read by the daemon at start, on SIGHUP and when
it changes (checked once a second off the event loop, so a fit applies within a second
without a signal). Each entry records the model@version it was fitted on and applies only
while that version answers: after a swap the config's threshold applies again.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sidecar.config import CloudConfig
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


def key(kind: str, *, task: str = "", model: str = "", examples: bool = False) -> str | None:
    """The entry a reply's threshold is looked up under (and a fit saved under): the one
    rule for both. None: no entry can apply, so the config's threshold does: a Classify
    with inline examples is scored by neighbour votes, while `classify:MODEL` was fitted
    on the confidence of labels alone."""
    if task:
        return f"task:{task}"
    if examples:
        return None
    return f"{kind}:{model}"


def config_threshold(
    kind: str, cloud: CloudConfig, task: str = "", own: float | None = None
) -> tuple[float, str]:
    """The threshold the config sets for a reply, and its key: the task's own (`own`),
    else `cloud.classify_threshold` / `cloud.extract_mean_logprob`."""
    if kind == "extract":
        return cloud.extract_mean_logprob, "cloud.extract_mean_logprob"
    if task and own is not None:
        return own, f"tasks.{task}.threshold"
    return cloud.classify_threshold, "cloud.classify_threshold"


# field -> (types, in range); a file is written by hand as often as by a fit, and an entry
# is read on the request path: anything describe() or the comparison cannot use is refused.
def _share(x: float) -> bool:
    return 0 <= x <= 1


FIELDS: dict[str, tuple[tuple[type, ...], Callable[[Any], bool]]] = {
    "threshold": ((int, float), math.isfinite),
    "target_accuracy": ((int, float), lambda x: 0 < x <= 1),
    "accuracy": ((int, float), _share),
    "kept_local": ((int, float), _share),
    "rows": ((int,), lambda x: x >= 0),
    "model": ((str,), lambda _x: True),
    "source": ((str,), lambda _x: True),
    "fitted_at": ((str,), lambda _x: True),
}
REQUIRED = ("threshold", "target_accuracy", "accuracy", "kept_local", "rows")
# What a threshold compares with: a probability, or a mean log-probability (never above 0).
RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "task": (_share, "within [0, 1]"),
    "classify": (_share, "within [0, 1]"),
    "extract": (lambda x: x <= 0, "at most 0 (a mean log-probability)"),
}


def entry(name: str, raw: object) -> Fitted:
    """One entry of the file, checked field by field. Raises ValueError saying what is wrong."""
    if not isinstance(raw, dict):
        raise ValueError(f"entry {name!r} is not an object")
    rng = RANGES.get(name.partition(":")[0])
    if rng is None:
        raise ValueError(f"entry {name!r}: the key is not task:, classify: or extract:")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise ValueError(f"entry {name!r}: unknown field {unknown[0]!r}")
    missing = [f for f in REQUIRED if f not in raw]
    if missing:
        raise ValueError(f"entry {name!r}: no {missing[0]!r}")
    for field, value in raw.items():
        types, ok = FIELDS[field]
        # bool is an int to Python, never to a person writing `true`
        if isinstance(value, bool) or not isinstance(value, types) or not ok(value):
            raise ValueError(f"entry {name!r}: {field} {value!r} is not valid")
    if not rng[0](raw["threshold"]):
        raise ValueError(f"entry {name!r}: threshold {raw['threshold']!r} is not {rng[1]}")
    return Fitted(**raw)


def _document(path: Path) -> dict[str, Any] | None:
    """The file as JSON with its shape checked; None when there is none. Raises ValueError
    for a damaged file (the entries are not checked here)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("thresholds"), dict):
        raise ValueError(f"{path}: no 'thresholds' object")
    if doc.get("version") != VERSION:
        raise ValueError(
            f"{path}: version {doc.get('version')!r} is not {VERSION}, the one read here"
        )
    return doc


def read_checked(path: Path) -> tuple[dict[str, Fitted], list[str]]:
    """The file's valid entries and why each other one was dropped ({} when there is no
    file). Raises ValueError for a damaged file."""
    doc = _document(path)
    out: dict[str, Fitted] = {}
    problems: list[str] = []
    for k, v in (doc or {}).get("thresholds", {}).items():
        try:
            out[k] = entry(k, v)
        except ValueError as e:
            problems.append(f"{path}: {e}")
    return out, problems


def read(path: Path) -> dict[str, Fitted]:
    """The file's entries; {} when there is none. Raises ValueError for a damaged file or entry."""
    out, problems = read_checked(path)
    if problems:
        raise ValueError(problems[0])
    return out


def save(path: Path, name: str, fit: Fitted) -> None:
    """Add or replace one entry, keeping the others as they are (atomically: a reader sees
    the old file or the new one). Raises ValueError, writing nothing, for a damaged file:
    replacing it would wipe the other entries, and a person should see it first.

    Two fits at once (two `sidecar eval --fit-threshold`) each read, change and write the
    file; an exclusive lock on `thresholds.json.lock` around that keeps both entries."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        doc = _document(path) or {"version": VERSION, "thresholds": {}}
        entries = dict(doc["thresholds"])
        entries[name] = asdict(entry(name, asdict(fit)))
        doc = {"version": VERSION, "thresholds": dict(sorted(entries.items()))}
        write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode())


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class FittedThresholds:
    """The daemon's view of the file. The request path reads only memory (`get`); the file
    is read at start, on SIGHUP (`reload`) and by `watch`, a loop that checks it once a
    second off the event loop, so a fit applies within a second without a signal."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, Fitted] = {}
        # (mtime_ns, size, inode) last read: a fit replaces the file (a new inode), so a
        # same-size rewrite within one mtime tick is still seen
        self._stamp: tuple[int, int, int] | None = None
        self._stale: dict[str, str] = {}  # key -> the model@version last served instead
        self.error = ""  # why the file, or an entry of it, was not used, for status
        self.reload()

    def reload(self) -> None:
        """Read the file if it changed (blocking: from a thread, or at start and SIGHUP)."""
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        except OSError as e:
            self.error = f"{self.path}: {e.strerror or e}"
            return
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            entries, problems = read_checked(self.path)
        except ValueError as e:
            # The config's thresholds apply until the file is fixed or refitted.
            self._entries, self.error = {}, str(e)
            log.error("fitted thresholds ignored: %s", e)
            return
        # Only a bad entry is dropped: its key falls back to the config, the others apply.
        self._entries, self.error = entries, "; ".join(problems)
        for p in problems:
            log.error("fitted threshold ignored: %s", p)
        log.info("fitted thresholds: %d from %s", len(entries), self.path)

    async def watch(self, every: float = CHECK_EVERY_S) -> None:
        """Re-read the file when it changes, until cancelled."""
        while True:
            await asyncio.sleep(every)
            try:
                await asyncio.to_thread(self.reload)
            except Exception:  # never let the watch die: the next tick tries again
                log.exception("checking %s", self.path)

    def get(self, name: str, serving: str = "") -> Fitted | None:
        """The entry for `name` if it was fitted on `serving` (name@version), else None: a
        value measured on one model version says nothing of another (an entry that names
        no model applies to any)."""
        got = self._entries.get(name)
        if got is None:
            return None
        if got.model and serving and got.model != serving:
            self._stale[name] = serving
            return None
        self._stale.pop(name, None)
        return got

    @property
    def entries(self) -> Mapping[str, Fitted]:
        return self._entries

    def report(self) -> dict[str, str]:
        """Key -> what applies, for `sidecar status`."""
        out = {}
        for k, v in sorted(self._entries.items()):
            serving = self._stale.get(k)
            if serving is not None and serving != v.model:
                out[k] = f"{v.threshold:g} stale (fitted on {v.model}, serving {serving})"
            else:
                out[k] = f"{v.threshold:g} {v.describe(k)}"
        if self.error:
            out["(error)"] = f"ignored: {self.error}"
        return out
