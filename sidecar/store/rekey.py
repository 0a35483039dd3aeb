"""Re-sealing every blob of a store with its current key (`sidecar models rekey`).

One blob at a time: the plaintext is read through the key its header names, checked
against the blob's name (its sha256), sealed with the current key into a partial file,
fsynced, and renamed over the blob (then the folder is fsynced). A rename is atomic, so a
kill -9 at any moment leaves each blob whole, sealed with either the old key or the new
one, and its header says which: a daemon given both keys (store.key_file and
store.previous_key_file) serves throughout, and running the rekey again finishes the job.
Plaintext blobs (a store from before encryption was turned on) are sealed the same way.

Quarantined files are re-sealed too, so the old key can be destroyed afterwards.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.fileio import fsync_dir
from sidecar.store import sealed
from sidecar.store.model_store import ModelStore

_SHA_BLOB = re.compile(r"[0-9a-f]{64}\.gguf")


@dataclass
class RekeyReport:
    resealed: list[str] = field(default_factory=list)
    already: int = 0
    failed: list[str] = field(default_factory=list)  # "file: why"


def _current_id(path: Path) -> str | None:
    try:
        return sealed.needed_key(path) if sealed.is_sealed(path) else None
    except sealed.SealError:
        return None


def rekey(store: ModelStore, progress: Callable[[str], None] = lambda _m: None) -> RekeyReport:
    """Move every blob and quarantined file of `store` to its current key."""
    assert store.keys is not None, "rekey needs a keyring"
    target = store.keys.current_id
    report = RekeyReport()
    for folder in (store.blobs, store.quarantine_dir):
        _sweep(folder)
    files = sorted(p for p in store.blobs.iterdir() if _SHA_BLOB.fullmatch(p.name))
    files += sorted(p for p in store.quarantine_dir.iterdir() if not p.name.endswith(".reason"))
    for path in files:
        if path.is_symlink() or not path.is_file():
            continue
        if _current_id(path) == target:
            report.already += 1
            continue
        try:
            _reseal(store, path, is_blob=path.parent == store.blobs)
        except FileNotFoundError:
            continue  # removed meanwhile (a gc of the running daemon)
        except (sealed.SealError, OSError) as e:
            why = getattr(e, "message", None) or str(e)
            report.failed.append(f"{path.name}: {why}")
            progress(f"failed {path.name}: {why}")
            continue
        report.resealed.append(path.name)
        progress(f"resealed {path.name}")
    return report


def _sweep(folder: Path) -> None:
    """Remove what a killed rekey left half-written (never a running one's)."""
    for p in folder.glob(".rekey-*.partial"):
        pid = p.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_RENAME_EXCHANGE = 2  # linux/fs.h


def _replace_existing(new: Path, old: Path) -> None:
    """Put `new` in place of `old` only if `old` is still there: a gc of the running daemon
    may remove a blob while it is being re-sealed, and a plain rename would bring it back
    as an orphan. renameat2(RENAME_EXCHANGE) swaps the two names atomically and fails if
    either is gone; `new`'s name then holds the old blob, removed here. A file system
    without it (EINVAL) gets a plain rename: the orphan risk, not a failed rekey."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        at_cwd = -100
        src, dst = os.fsencode(new), os.fsencode(old)
        if renameat2(at_cwd, src, at_cwd, dst, _RENAME_EXCHANGE) == 0:
            new.unlink()
            return
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            raise FileNotFoundError(err, os.strerror(err), str(old))
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), str(old))
    os.replace(new, old)


def _reseal(store: ModelStore, path: Path, *, is_blob: bool) -> None:
    mode = os.stat(path).st_mode & 0o777
    partial = path.parent / f".rekey-{os.getpid()}-{path.name}.partial"
    partial.unlink(missing_ok=True)
    try:
        sha = store._seal_into(path, partial, 0o600)
        if is_blob and sha != path.name.removesuffix(".gguf"):
            raise sealed.Damaged(
                f"its content hashes to {sha[:12]}, not its name: left as it is "
                "(the daemon sets it aside when it next verifies it)"
            )
        os.chmod(partial, mode)
        _replace_existing(partial, path)
        fsync_dir(path.parent)
    finally:
        partial.unlink(missing_ok=True)
    if is_blob:
        store._record(sha)  # hashed just now: the daemon need not hash it again
