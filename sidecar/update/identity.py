"""This daemon's identity in a fleet, the one input of the rollout hash (`cohort`) that is
its own. It must stay the same across restarts and reinstalls, or a daemon would wander in
and out of a rollout's cohort:

1. `update.identity` when set (e.g. the hostname, or an inventory id the operator already
   uses: then the cohorts can be computed from the inventory);
2. else derived from /etc/machine-id: not the id itself, which machine-id(5) asks
   applications not to expose, but a sha256 keyed for sidecar, as systemd's
   sd_id128_get_machine_app_specific does for the same reason;
3. else (no machine-id: some containers) a random id, written once to `<store>/updates/identity`.

Cloned VM images that share a machine-id share a cohort; set `update.identity` there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from sidecar.fileio import fsync_dir

log = logging.getLogger("sidecar.update")

MACHINE_ID = Path("/etc/machine-id")


@dataclass(frozen=True)
class Identity:
    value: str
    source: str  # where it came from, for status and the log


def resolve(configured: str, state_dir: Path, machine_id: Path = MACHINE_ID) -> Identity:
    if configured:
        return Identity(configured, "update.identity")
    try:
        mid = machine_id.read_text().strip()
    except OSError:
        mid = ""
    if len(mid) == 32 and all(c in "0123456789abcdef" for c in mid):
        derived = hashlib.sha256(f"sidecar-rollout:{mid}".encode()).hexdigest()[:32]
        return Identity(derived, str(machine_id))
    return Identity(_persisted(state_dir / "identity"), str(state_dir / "identity"))


def _persisted(path: Path) -> str:
    try:
        text = path.read_text().strip()
        if text:
            return text
        path.unlink()  # emptied by hand or by a broken disk: choose again
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
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
