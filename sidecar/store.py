"""The model store: named models, versions addressed by sha256, an atomic "active" pointer.

    <root>/blobs/<sha256>.gguf          immutable, verified model files
    <root>/models/<name>/versions/<sha> membership markers (a blob may serve several names)
    <root>/models/<name>/active         the sha256 serving <name>; written atomically
    <root>/models/<name>/previous       the one before, kept by gc for rollback
    <root>/quarantine/                  files refused by validation or canary, with a .reason

Every write is atomic (a *.partial file, fsync, verify, os.replace, fsync the directory),
so after a kill -9 at any moment the store holds only complete, verified files and the
pointers name one of them. Partial files are never read as models and are swept on open.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from sidecar.errors import FailedPrecondition, InvalidRequest, ModelNotFound
from sidecar.gguf_check import GGUFError
from sidecar.gguf_check import check as check_gguf

CHUNK = 1 << 20
SHORT = 12  # the version prefix replies show


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class VersionInfo:
    name: str
    sha256: str
    size: int
    added: float
    active: bool
    previous: bool

    @property
    def short(self) -> str:
        return self.sha256[:SHORT]


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.models = root / "models"
        self.quarantine_dir = root / "quarantine"
        for d in (self.blobs, self.models, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in self.blobs.glob("*.partial"):  # left by a crash mid-copy
            stale.unlink(missing_ok=True)

    # ---------------------------------------------------------------- reading

    def blob(self, sha: str) -> Path:
        return self.blobs / f"{sha}.gguf"

    def names(self) -> list[str]:
        return sorted(p.name for p in self.models.iterdir() if p.is_dir())

    def versions(self, name: str) -> list[str]:
        d = self.models / name / "versions"
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def _pointer(self, name: str, which: str) -> str | None:
        p = self.models / name / which
        try:
            sha = p.read_text().strip()
        except FileNotFoundError:
            return None
        return sha if self.blob(sha).is_file() else None

    def active(self, name: str) -> str | None:
        return self._pointer(name, "active")

    def previous(self, name: str) -> str | None:
        return self._pointer(name, "previous")

    def resolve(self, name: str, version: str) -> str:
        """A full sha256 from a version or a unique prefix of one."""
        matches = [v for v in self.versions(name) if v.startswith(version.lower())]
        if len(matches) != 1:
            known = ", ".join(v[:SHORT] for v in self.versions(name)) or "none"
            what = "no" if not matches else "more than one"
            raise ModelNotFound(f"{what} version of {name!r} matches {version!r} (known: {known})")
        return matches[0]

    def info(self, name: str, sha: str) -> VersionInfo:
        st = self.blob(sha).stat()
        return VersionInfo(
            name, sha, st.st_size, st.st_mtime, sha == self.active(name), sha == self.previous(name)
        )

    def all_versions(self) -> list[VersionInfo]:
        return [self.info(name, sha) for name in self.names() for sha in self.versions(name)]

    # ---------------------------------------------------------------- writing

    def add(self, src: Path, name: str, *, expect_sha256: str | None = None) -> str:
        """Copy (or hardlink) a verified GGUF into the store under `name`; return its sha256."""
        _check_name(name)
        if not src.is_file():
            raise InvalidRequest(f"no file at {src}")
        try:
            check_gguf(src)
        except GGUFError as e:
            raise GGUFError(f"{src}: {e.message}") from None
        sha = self._import(src)
        if expect_sha256 and sha != expect_sha256:
            raise InvalidRequest(f"{src} has sha256 {sha}, expected {expect_sha256}")
        marker_dir = self.models / name / "versions"
        marker_dir.mkdir(parents=True, exist_ok=True)
        (marker_dir / sha).touch()
        fsync_dir(marker_dir)
        return sha

    def _import(self, src: Path) -> str:
        partial = self.blobs / f".{os.getpid()}-{time.monotonic_ns()}.partial"
        try:
            try:
                os.link(src, partial)  # same filesystem: instant, and blobs are never written
            except OSError:
                with src.open("rb") as fin, partial.open("wb") as fout:
                    shutil.copyfileobj(fin, fout, CHUNK)
                    fout.flush()
                    os.fsync(fout.fileno())
            sha = sha256_file(partial)
            final = self.blob(sha)
            if final.exists():
                partial.unlink()
            else:
                os.chmod(partial, 0o444)
                os.replace(partial, final)
                fsync_dir(self.blobs)
            return sha
        finally:
            partial.unlink(missing_ok=True)

    def activate(self, name: str, sha: str) -> None:
        """Point `name` at `sha` (which must be a version of it); the old one becomes previous."""
        if sha not in self.versions(name):
            raise ModelNotFound(f"{sha[:SHORT]} is not a version of {name!r}")
        d = self.models / name
        current = self.active(name)
        if current == sha:
            return
        if current:
            write_atomic(d / "previous", current.encode())
        write_atomic(d / "active", sha.encode())

    def remove(self, name: str, sha: str, in_use: set[str]) -> None:
        if sha == self.active(name):
            raise FailedPrecondition(
                f"{name}@{sha[:SHORT]} is active: activate another version first"
            )
        if sha in in_use:
            raise FailedPrecondition(f"{name}@{sha[:SHORT]} is in use by a worker")
        (self.models / name / "versions" / sha).unlink(missing_ok=True)
        if self.previous(name) == sha:
            (self.models / name / "previous").unlink(missing_ok=True)
        self._drop_unreferenced(sha, in_use)

    def gc(self, in_use: set[str]) -> list[str]:
        """Remove every version that is not active, previous or in use; return what went."""
        removed = []
        for name in self.names():
            keep = {self.active(name), self.previous(name)} | in_use
            for sha in self.versions(name):
                if sha not in keep:
                    self.remove(name, sha, in_use)
                    removed.append(f"{name}@{sha[:SHORT]}")
        return removed

    def _drop_unreferenced(self, sha: str, in_use: set[str]) -> None:
        if sha in in_use or any(sha in self.versions(n) for n in self.names()):
            return
        self.blob(sha).unlink(missing_ok=True)

    def quarantine(self, src: Path, reason: str, *, move: bool = True) -> Path:
        """Put a refused file aside with its reason: moved (a dropped file) or copied (a blob
        other names may still use, or a file the user pointed us at)."""
        dest = self.quarantine_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{src.name}"
        with contextlib.suppress(FileNotFoundError):
            try:
                if not move:
                    raise OSError("copy requested")
                os.replace(src, dest)
            except OSError:
                shutil.copyfile(src, dest)
        write_atomic(dest.with_name(dest.name + ".reason"), reason.encode())
        return dest


def startup_blob(store: ModelStore, name: str, configured: Path) -> Path:
    """The file to serve `name` from at start: the store's active version, unless the
    configured path is new or changed since it last seeded the store (then it is imported
    and activated). So swaps survive restarts, and editing the config still wins. A
    configured file that does not exist is an error, never a silent fallback."""
    seed_file = store.models / name / "seed"
    try:
        st = configured.stat()
    except FileNotFoundError:
        raise FailedPrecondition(f"model {name!r}: no file at {configured}") from None
    seed = f"{configured.resolve()}\t{st.st_size}\t{st.st_mtime_ns}"
    active = store.active(name)
    old_seed = seed_file.read_text() if seed_file.exists() else None
    if active and seed == old_seed:
        return store.blob(active)
    sha = store.add(configured, name)
    store.activate(name, sha)
    write_atomic(seed_file, seed.encode())
    return store.blob(sha)


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or len(name) > 64:
        raise InvalidRequest(f"bad model name {name!r}: use 1-64 characters, no '/' or leading '.'")
