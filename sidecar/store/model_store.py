"""Named models, versions addressed by sha256, an atomic "active" pointer per name.

The layout on disk and what may be deleted are described in `sidecar.store`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import re
import stat
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

from sidecar.domain.errors import FailedPrecondition, InvalidRequest, ModelNotFound
from sidecar.domain.names import check_name, name_problem, shown
from sidecar.domain.versions import SHORT, VersionInfo
from sidecar.fileio import CHUNK, clone_or_copy, fsync_dir, sha256_stream, write_atomic
from sidecar.gguf_check import GGUFError, GGUFInfo, check_stream
from sidecar.store import images, sealed
from sidecar.store.images import Images
from sidecar.store.keys import Keyring
from sidecar.store.quarantine import Quarantine

_SHA = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-fA-F]{1,64}")

log = logging.getLogger("sidecar.store")

ADAPTERS = "adapters"  # <root>/adapters/<base model>/<adapter>/...: the names of LoRA adapters


class BlobChanged(FailedPrecondition):
    """A stored blob no longer has the bytes its name promises; it was set aside."""


def _stamp(st: os.stat_result) -> str:
    # ctime cannot be set by a user: any write, chmod or relink of the blob changes it.
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ino} {st.st_ctime_ns}"


class ModelStore:
    def __init__(self, root: Path, keys: Keyring | None = None, *, encrypt: bool = False) -> None:
        """`keys`: what sealed blobs are read with; `encrypt`: new blobs (and quarantined
        files) are sealed with `keys.current`. Every read of a blob's bytes goes through
        `open_plain`, every write of one through `_seal_into`."""
        if encrypt and keys is None:
            raise FailedPrecondition("store.encryption is on but no key was given")
        if encrypt and (why := images.supported()):
            raise FailedPrecondition(why)
        self.keys = keys
        self.encrypt = encrypt
        self.images = Images(self._decrypt_to_memory)
        self.root = root
        self.blobs = root / "blobs"
        self.models = root / "models"
        self.stamps = root / "verified"
        for d in (self.blobs, self.models, self.stamps):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Admin calls and swaps reach the store from several threads: what gc decides to
        # delete must not race an add or a hold of the same version.
        self._lock = threading.RLock()
        self._held: Counter[str] = Counter()
        # hold/release run on the event loop: they take only this lock, never `_lock`, which
        # file work (a gc, a quarantine copy) can hold for a while.
        self._held_lock = threading.Lock()
        self._quarantine = Quarantine(
            root / "quarantine", self._lock, self._owns, self._seal_into if encrypt else None
        )
        self.quarantine_dir = self._quarantine.dir
        self.label = ""  # what a removed version's name is prefixed with ("base:" for adapters)

    def view(self, base: str) -> ModelStore:
        """The adapters of model `base`: the same store (blobs, stamps, locks, holds,
        quarantine) with its names kept under <root>/adapters/<base> instead of models/."""
        check_name(base)
        v = copy.copy(self)  # shallow: every view shares the one lock, hold count and blobs
        v.models = self.root / ADAPTERS / base
        v.models.mkdir(parents=True, exist_ok=True, mode=0o700)
        v.label = f"{base}:"
        return v

    def spaces(self) -> list[ModelStore]:
        """The models' names and every base model's adapters: what gc and removal consult."""
        d = self.root / ADAPTERS
        bases = (
            sorted(p.name for p in d.iterdir() if name_problem(p.name) is None and p.is_dir())
            if d.is_dir()
            else []
        )
        root = copy.copy(self)
        root.models, root.label = self.root / "models", ""
        return [root, *(root.view(b) for b in bases)]

    def sweep(self) -> None:
        """Delete the partial copies a crash left behind. Only the store's one owner (the
        daemon holding the socket) may: another's copies in flight look the same."""
        for stale in self.blobs.glob("*.partial"):
            stale.unlink(missing_ok=True)

    # ---------------------------------------------------------------- paths

    def blob(self, sha: str) -> Path:
        if not _SHA.fullmatch(sha):
            raise InvalidRequest(f"not a sha256: {shown(sha)}")
        return self.blobs / f"{sha}.gguf"

    def _model_dir(self, name: str) -> Path:
        """<root>/models/<name>, for a valid name only, and never a path outside the store."""
        check_name(name)
        d = self.models / name
        if d.resolve().parent != self.models.resolve():
            raise InvalidRequest(f"model {shown(name)} resolves outside the store")
        return d

    # ---------------------------------------------------------------- bytes

    @contextlib.contextmanager
    def open_plain(self, path: Path) -> Iterator[BinaryIO]:
        """The plaintext of a file the store reads (a blob, a caller's file, a rebuilt
        update): decrypted when it is sealed, as it is otherwise."""
        f = path.open("rb")
        try:
            if f.read(len(sealed.MAGIC)) == sealed.MAGIC:
                f.seek(0)
                reader = sealed.SealedReader(f, self.keys.by_id if self.keys else {}, path)
                with reader:
                    yield reader  # type: ignore[misc]
                return
            f.seek(0)
            yield f
        finally:
            f.close()

    @staticmethod
    def _size(f: BinaryIO) -> int:
        if isinstance(f, sealed.SealedReader):
            return f.size
        return os.fstat(f.fileno()).st_size

    def plain_size(self, path: Path) -> int:
        with self.open_plain(path) as f:
            return self._size(f)

    def gguf(self, path: Path) -> GGUFInfo:
        """The GGUF header of a file's plaintext (see `sidecar.gguf_check`)."""
        with self.open_plain(path) as f:
            return check_stream(f, self._size(f))

    def sha256(self, path: Path) -> str:
        """The sha256 of a file's plaintext: the name of the version it is."""
        with self.open_plain(path) as f:
            return sha256_stream(f)

    def _seal_into(self, src: Path, dst: Path, mode: int = 0o600) -> str:
        """Write `dst` (which must not exist) as the sealed copy of `src`'s plaintext,
        fsynced; return the plaintext's sha256. A sealed `src` is decrypted and sealed
        again with the current key."""
        assert self.keys is not None
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as out, self.open_plain(src) as plain:
            sha = sealed.seal_stream(plain, out, self.keys.current)
            out.flush()
            os.fsync(out.fileno())
        return sha

    @contextlib.contextmanager
    def open_output(self, path: Path) -> Iterator[BinaryIO]:
        """A new file (0600) that will be handed to `add` (a rebuilt update): on an
        encrypted store what is written is sealed on the way, so it is never on disk in
        plaintext. Durable (fsynced) once the context exits."""
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        with os.fdopen(fd, "wb") as out:
            if self.encrypt:
                assert self.keys is not None
                writer = sealed.SealWriter(out, self.keys.current)
                yield writer  # type: ignore[misc]
                writer.close()
            else:
                yield out
            out.flush()
            os.fsync(out.fileno())

    def download_sink(self, size: int) -> sealed.Resumable | None:
        """How an update download of `size` bytes is kept: sealed as it comes on an
        encrypted store (resuming at a chunk boundary), None for as it comes."""
        if not self.encrypt:
            return None
        assert self.keys is not None
        return sealed.Resumable(self.keys.current, size)

    def download_digest(self, path: Path) -> str:
        """The sha256 of a download's plaintext ("unreadable ..." when a sealed one fails
        authentication: it does not match, and is fetched again)."""
        try:
            return self.sha256(path)
        except sealed.SealError as e:
            return f"unreadable ({e.message})"

    def worker_fd(self, path: Path) -> int | None:
        """The memfd a worker maps instead of `path` when that blob is sealed (one per
        version, shared by its workers); None for a plaintext file, mapped directly."""
        if path.parent != self.blobs or not sealed.is_sealed(path):
            return None
        return self.images.fd(path.stem)

    def adapter_fd(self, path: Path) -> int | None:
        """For a worker about to load a sealed LoRA blob: a descriptor of its decrypted
        memfd that the caller owns (it is handed to the worker and closed); None for a
        plaintext file, which llama.cpp reads directly."""
        if path.parent != self.blobs or not sealed.is_sealed(path):
            return None
        return self.images.dup(path.stem)

    def _decrypt_to_memory(self, sha: str) -> int:
        with self.open_plain(self.blob(sha)) as f:
            if not isinstance(f, sealed.SealedReader):
                raise FailedPrecondition(f"blob {sha[:SHORT]} is not sealed")
            return images.sealed_memfd(f, sha)

    # ---------------------------------------------------------------- reading

    def names(self) -> list[str]:
        return sorted(
            p.name
            for p in self.models.iterdir()
            if name_problem(p.name) is None and p.is_dir() and not p.is_symlink()
        )

    def versions(self, name: str) -> list[str]:
        d = self._model_dir(name) / "versions"
        return sorted(p.name for p in d.iterdir() if _SHA.fullmatch(p.name)) if d.is_dir() else []

    def _pointer(self, name: str, which: str) -> str | None:
        p = self._model_dir(name) / which
        try:
            sha = p.read_text().strip()
        except FileNotFoundError:
            return None
        return sha if _SHA.fullmatch(sha) and self.blob(sha).is_file() else None

    def active(self, name: str) -> str | None:
        return self._pointer(name, "active")

    def previous(self, name: str) -> str | None:
        return self._pointer(name, "previous")

    def resolve(self, name: str, version: str) -> str:
        """A full sha256 from a version or a unique prefix of one."""
        known = self.versions(name)
        if not _HEX.fullmatch(version):
            raise InvalidRequest(
                f"bad version {shown(version)} of {name!r}: give a sha256 or a prefix of one "
                "(hex digits)"
            )
        matches = [v for v in known if v.startswith(version.lower())]
        if len(matches) != 1:
            listed = ", ".join(v[:SHORT] for v in known) or "none"
            what = "no" if not matches else "more than one"
            raise ModelNotFound(f"{what} version of {name!r} matches {version!r} (known: {listed})")
        return matches[0]

    def info(self, name: str, sha: str) -> VersionInfo:
        blob = self.blob(sha)
        st = blob.stat()
        size = st.st_size
        with contextlib.suppress(sealed.SealError):  # listed by its on-disk size then
            size = self.plain_size(blob)
        return VersionInfo(
            name, sha, size, st.st_mtime, sha == self.active(name), sha == self.previous(name)
        )

    def all_versions(self) -> list[VersionInfo]:
        out = []
        for name in self.names():
            for sha in self.versions(name):
                with contextlib.suppress(FileNotFoundError):  # a marker whose blob was set aside
                    out.append(self.info(name, sha))
        return out

    # ---------------------------------------------------------------- writing

    def add(
        self, src: Path, name: str, *, expect_sha256: str | None = None, hold: bool = False
    ) -> str:
        """Copy a verified GGUF into the store under `name`; return its sha256.

        The caller's file is checked where it lies first (cheap: the header and tables), so
        a file that is not a model is never copied; the copy is then checked again, since
        that copy, not the caller's file, is what will be served. hold=True: the version
        is held (see `hold`) from the moment it exists, so no gc can slip in between."""
        marker_dir = self._model_dir(name) / "versions"
        try:
            if not stat.S_ISREG(src.stat().st_mode):
                raise InvalidRequest(f"{src} is not a regular file")
            self.gguf(src)
        except GGUFError as e:
            raise GGUFError(f"{src}: {e.message}") from None
        except OSError as e:
            raise InvalidRequest(f"cannot read {src}: {e.strerror or e}") from None
        partial, sha = self._copy(src, expect_sha256)  # the slow part: outside the lock
        try:
            with self._lock:  # blob, marker and hold appear together for gc and remove
                final = self.blob(sha)
                if not final.is_file():
                    os.chmod(partial, 0o444)  # our own copy: blobs are never written again
                    os.replace(partial, final)
                    fsync_dir(self.blobs)
                    self._record(sha)
                self._mark(marker_dir, sha, hold)
        finally:
            partial.unlink(missing_ok=True)
        return sha

    def adopt(self, name: str, sha: str, *, hold: bool = False) -> str:
        """Make a blob the store already has a version of `name` too, without copying it
        (an update to a version stored under another name, or swapped away from)."""
        marker_dir = self._model_dir(name) / "versions"
        self.verify(sha)
        with self._lock:
            if not self.blob(sha).is_file():  # set aside since it was verified
                raise ModelNotFound(f"version {sha[:SHORT]} is not in the store")
            self._mark(marker_dir, sha, hold)
        return sha

    def _mark(self, marker_dir: Path, sha: str, hold: bool) -> None:
        marker_dir.mkdir(parents=True, exist_ok=True)
        (marker_dir / sha).touch()
        fsync_dir(marker_dir)
        if hold:
            self.hold(sha)

    def hold(self, sha: str) -> None:
        """Keep `sha` from `remove` and `gc` until `release`: a swap holds the version it
        loads until the pointers name it, as no worker maps it before it has started."""
        with self._held_lock:
            self._held[sha] += 1

    def release(self, sha: str) -> None:
        with self._held_lock:
            self._held[sha] -= 1
            if self._held[sha] <= 0:
                del self._held[sha]

    def held(self) -> set[str]:
        """The versions being swapped in now (see `hold`)."""
        return self._held_now()

    def _held_now(self) -> set[str]:
        with self._held_lock:
            return set(self._held)

    def _copy(self, src: Path, expect_sha256: str | None) -> tuple[Path, str]:
        """A checked private copy of `src` (a partial file the caller publishes or
        removes) and its sha256."""
        partial = self.blobs / f".{os.getpid()}-{time.monotonic_ns()}.partial"
        try:
            try:
                if self.encrypt:
                    copied: str | None = self._seal_into(src, partial)
                elif sealed.is_sealed(src):  # a sealed update into a plaintext store
                    copied = self._unseal_into(src, partial)
                else:
                    copied = clone_or_copy(src, partial, 0o600)
            except OSError as e:
                raise InvalidRequest(f"cannot read {src}: {e.strerror or e}") from None
            try:
                self.gguf(partial)  # the bytes we will serve, whatever `src` did meanwhile
            except GGUFError as e:
                raise GGUFError(f"{src}: {e.message}") from None
            sha = copied or self.sha256(partial)
            if expect_sha256 and sha != expect_sha256:
                raise InvalidRequest(f"{src} has sha256 {sha}, expected {expect_sha256}")
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return partial, sha

    def _unseal_into(self, src: Path, dst: Path) -> str:
        h = hashlib.sha256()
        fd = os.open(
            dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        with os.fdopen(fd, "wb") as out, self.open_plain(src) as plain:
            while block := plain.read(CHUNK):
                h.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        return h.hexdigest()

    def _record(self, sha: str) -> None:
        write_atomic(self.stamps / sha, _stamp(os.lstat(self.blob(sha))).encode())

    def verify(self, sha: str) -> None:
        """Raise BlobChanged (and set the blob aside) unless the blob still hashes to `sha`.

        Cheap when nothing touched it since it was last hashed (one stat); a full sha256
        otherwise, and always for a blob that shares its inode with another name (a store
        from before imports copied): that one is also given an inode of its own."""
        blob = self.blob(sha)
        try:
            st = os.lstat(blob)
        except FileNotFoundError:
            raise ModelNotFound(f"version {sha[:SHORT]} is not in the store") from None
        try:
            recorded = (self.stamps / sha).read_text().strip()
        except FileNotFoundError:
            recorded = ""
        shared = st.st_nlink > 1
        if stat.S_ISREG(st.st_mode) and not shared and recorded == _stamp(st):
            return
        try:
            actual = self.sha256(blob) if stat.S_ISREG(st.st_mode) else "not a regular file"
        except sealed.MissingKey:
            raise  # not the blob's fault: it stays, and the error names the key it needs
        except sealed.Damaged as e:
            actual = f"unreadable ({e.message})"
        if actual == sha and shared:
            # The other link can be rewritten between the hash and the copy: the copy, not
            # the blob, is what must hash to `sha`.
            actual = self._unshare(sha)
        if actual != sha:
            (self.stamps / sha).unlink(missing_ok=True)
            reason = f"blob {sha} changed on disk: its content now hashes to {actual}"
            if actual.startswith("unreadable"):
                reason = f"blob {sha} changed on disk: {actual}"
            where = self.quarantine(blob, reason)
            for space in self.spaces():
                for name in space.names():
                    (space._model_dir(name) / "versions" / sha).unlink(missing_ok=True)
            log.warning("%s (set aside as %s)", reason, where.name)
            now = actual if actual.startswith("unreadable") else f"now {actual[:SHORT]}"
            raise BlobChanged(
                f"version {sha[:SHORT]} was changed on disk after it was stored ({now}); "
                "it was removed from the store: add the file again"
            )
        self._record(sha)

    def _unshare(self, sha: str) -> str:
        """Give the blob an inode of its own; the sha256 of the copy (it replaces the blob
        only when that is `sha`)."""
        blob = self.blob(sha)
        partial = self.blobs / f".{os.getpid()}-{time.monotonic_ns()}.partial"
        try:
            copied = clone_or_copy(blob, partial, 0o444) or self.sha256(partial)
            if copied == sha:
                os.replace(partial, blob)
                fsync_dir(self.blobs)
            return copied
        finally:
            partial.unlink(missing_ok=True)

    def activate(self, name: str, sha: str) -> None:
        """Point `name` at `sha` (which must be a version of it); the old one becomes previous."""
        with self._lock:
            if sha not in self.versions(name):
                raise ModelNotFound(f"{sha[:SHORT]} is not a version of {name!r}")
            d = self._model_dir(name)
            current = self.active(name)
            if current == sha:
                return
            if current:
                write_atomic(d / "previous", current.encode())
            write_atomic(d / "active", sha.encode())

    def remove(self, name: str, sha: str, in_use: Collection[str]) -> None:
        """Remove one version of `name`. `in_use`: the sha256 of every blob a live worker
        maps (a mapping may say, as its value, which worker)."""
        d = self._model_dir(name)
        self.blob(sha)  # refuses anything but a sha256 before it becomes part of a path
        with self._lock:
            if sha == self.active(name):
                raise FailedPrecondition(
                    f"{name}@{sha[:SHORT]} is active: activate another version first"
                )
            if sha in in_use:
                who = in_use.get(sha) if isinstance(in_use, Mapping) else None
                raise FailedPrecondition(
                    f"{name}@{sha[:SHORT]} is in use by a worker"
                    + (f" ({who})" if who else "")
                    + ": try again once it has stopped"
                )
            if sha in self._held_now():
                raise FailedPrecondition(
                    f"{name}@{sha[:SHORT]} is being swapped in: try again when the swap is over"
                )
            (d / "versions" / sha).unlink(missing_ok=True)
            if self.previous(name) == sha:
                (d / "previous").unlink(missing_ok=True)
            self._drop_unreferenced(sha, in_use)

    def gc(self, in_use: Collection[str]) -> list[str]:
        """Remove every version nothing needs, and apply the quarantine's bound; return
        what went ("name@version", "quarantine/<entry>").

        Kept: what a live worker maps (`in_use`), what is being swapped in, what any name's
        active or previous pointer names (one blob may serve several names), and every
        version of a name that has never been activated (added, and not yet replaced)."""
        removed = []
        with self._lock:
            spaces = self.spaces()  # models and adapters share blobs: one keep set for all
            pointed: set[str | None] = set()
            for space in spaces:
                for n in space.names():
                    pointed |= {space.active(n), space.previous(n)}
            keep = pointed | set(in_use) | self._held_now()
            for space in spaces:
                for name in space.names():
                    if space.active(name) is None:
                        continue
                    for sha in space.versions(name):
                        if sha not in keep:
                            try:
                                space.remove(name, sha, in_use)
                            except FailedPrecondition:  # held since `keep` was read: kept
                                continue
                            removed.append(f"{space.label}{name}@{sha[:SHORT]}")
        return removed + [f"quarantine/{e}" for e in self.quarantine_cleanup()]

    def _drop_unreferenced(self, sha: str, in_use: Collection[str]) -> None:
        if (
            sha in in_use
            or sha in self._held_now()
            or any(sha in s.versions(n) for s in self.spaces() for n in s.names())
        ):
            return
        self.blob(sha).unlink(missing_ok=True)
        (self.stamps / sha).unlink(missing_ok=True)

    def _owns(self, path: Path) -> bool:
        try:
            return not path.is_symlink() and path.resolve().is_relative_to(self.root.resolve())
        except OSError:
            return False

    def quarantine(self, src: Path, reason: str, *, move: bool = True) -> Path:
        """Set a refused file aside with its reason (see `Quarantine.put`); return where."""
        return self._quarantine.put(src, reason, move=move)

    def quarantine_cleanup(self, *, empty: bool = False) -> list[str]:
        """Apply the quarantine's bound, or empty it; the entries removed, oldest first."""
        return self._quarantine.cleanup(empty=empty)
