"""This daemon's identity in a fleet, the one input of the rollout hash (`cohort`) that is
its own. It must stay the same across restarts and reinstalls, or a daemon would wander in
and out of a rollout's cohort:

1. `update.identity` when set (e.g. the hostname, or an inventory id the operator already
   uses: then the cohorts can be computed from the inventory);
2. else a random id written before to `<store>/updates/.identity`: once a daemon has
   chosen one (no machine-id at the time, e.g. on a first boot that had not initialised
   it yet) it keeps it, so a machine-id that appears later does not move it to another
   cohort;
3. else derived from /etc/machine-id: not the id itself, which machine-id(5) asks
   applications not to expose, but a sha256 keyed for sidecar, as systemd's
   sd_id128_get_machine_app_specific does for the same reason. An empty file or
   `uninitialized` (machine-id(5)'s first-boot marker) counts as none;
4. else (no machine-id: some containers) a random id, written once to that file. The name
   starts with '.', which no model name can, so it never meets a model's work folder
   (`<store>/updates/<name>`).

If that file can be neither read nor written, the id is derived from the hostname for this
run (logged): status and updates keep working, and a hostname is as stable as a container.

Cloned VM images that share a machine-id share a cohort; set `update.identity` there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from sidecar.fileio import fsync_dir

log = logging.getLogger("sidecar.update")

MACHINE_ID = Path("/etc/machine-id")
FILE = ".identity"  # in <store>/updates


@dataclass(frozen=True)
class Identity:
    value: str
    source: str  # where it came from, for status and the log


def resolve(configured: str, state_dir: Path, machine_id: Path | None = None) -> Identity:
    if configured:
        return Identity(configured, "update.identity")
    machine_id = machine_id or MACHINE_ID  # read per call: a test may point it elsewhere
    path = state_dir / FILE
    try:
        kept = _read(path)
        if kept:
            return Identity(kept, str(path))
        mid = _machine_id(machine_id)
        if mid:
            return Identity(_keyed("sidecar-rollout", mid), str(machine_id))
        return Identity(_persisted(path), str(path))
    except OSError as e:
        host = socket.gethostname()
        log.warning(
            "update identity: %s is unusable (%s); using one derived from the hostname %r "
            "for this run",
            path,
            e,
            host,
        )
        return Identity(_keyed("sidecar-rollout-host", host), f"hostname ({path}: {e})")


def _keyed(key: str, value: str) -> str:
    return hashlib.sha256(f"{key}:{value}".encode()).hexdigest()[:32]


def _machine_id(path: Path) -> str:
    try:
        mid = path.read_text().strip()
    except OSError:
        return ""
    if len(mid) == 32 and all(c in "0123456789abcdef" for c in mid):
        return mid
    return ""  # empty, "uninitialized" (first boot) or damaged: none


def _read(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return ""
    if not text:
        path.unlink()  # emptied by hand or by a broken disk: choose again
    return text


def _persisted(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    tmp.write_text(uuid.uuid4().hex + "\n")
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    try:
        # link, not replace: of two processes racing here, the first id written wins and
        # both read it back, so the identity is chosen exactly once.
        os.link(tmp, path)
        fsync_dir(path.parent)
        log.info("update identity: a new random id in %s (no /etc/machine-id)", path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()
