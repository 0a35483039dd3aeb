"""The store's encryption keys: where they come from, and which one seals new blobs.

A key is 32 random bytes written as 64 hex digits (`sidecar models keygen`). Sources,
strongest first; the first that is configured is the current key:

1. a systemd credential (`LoadCredentialEncrypted=sidecar-store-key:...` in the unit):
   systemd decrypts it into a private in-memory folder named by $CREDENTIALS_DIRECTORY,
   readable by the service only and gone when it stops;
2. `store.key_file`: refused unless it is a regular file owned by the daemon's user with
   mode 0600 (another user who can read it can read every model);
3. `store.key` (meant as SIDECAR_STORE_KEY): the weakest, as the environment of a process
   is visible to root and to anything that inherits or dumps it.

`store.previous_key_file` is the key before a rekey: blobs still sealed with it stay
readable (each blob's header names the key id it needs) while `sidecar models rekey`
moves them to the current key, and after a rekey was killed half way.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.domain.errors import FailedPrecondition
from sidecar.store.sealed import KEY_BYTES, key_id

CREDENTIAL = "sidecar-store-key"


@dataclass(frozen=True)
class Keyring:
    """The key new blobs are sealed with, and every key a blob may need (by key id).
    Its repr names key ids only: a keyring that reaches a log or a traceback's locals
    must not give the keys away."""

    current: bytes = field(repr=False)
    older: tuple[bytes, ...] = field(default=(), repr=False)
    by_id: Mapping[str, bytes] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ids = {key_id(k): k for k in (*self.older, self.current)}
        object.__setattr__(self, "by_id", ids)

    @property
    def current_id(self) -> str:
        return key_id(self.current)

    def __repr__(self) -> str:
        return f"Keyring(current={self.current_id}, ids={sorted(self.by_id)})"


def parse_key(text: str, where: str) -> bytes:
    hexed = text.strip()
    try:
        key = bytes.fromhex(hexed)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise FailedPrecondition(
            f"{where} is not a store key: expected {2 * KEY_BYTES} hex digits "
            "(make one with `sidecar models keygen -o PATH`)"
        )
    return key


def read_key_file(path: Path, what: str = "store.key_file") -> bytes:
    """A key file's key; refused unless ours, a regular file, and mode 0600 (or 0400)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise FailedPrecondition(f"{what} {path}: cannot open: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FailedPrecondition(f"{what} {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise FailedPrecondition(
                f"{what} {path} is owned by uid {st.st_uid}, not by the daemon's user "
                f"(uid {os.geteuid()}): chown it"
            )
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise FailedPrecondition(
                f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}: others can read "
                f"it; chmod 600 {path}"
            )
        text = os.read(fd, 4096).decode("ascii", errors="replace")
    finally:
        os.close(fd)
    return parse_key(text, f"{what} {path}")


def current_key(
    key_file: Path | None, env_key: str, env: Mapping[str, str], credential: str = CREDENTIAL
) -> tuple[bytes, str] | None:
    """The configured current key and where it came from; None if none is configured."""
    creds = env.get("CREDENTIALS_DIRECTORY", "")
    if creds and (Path(creds) / credential).is_file():
        path = Path(creds) / credential
        # systemd made it (root-owned, 0400, in a private ramfs): no ownership check.
        return parse_key(path.read_text(errors="replace"), f"credential {path}"), str(path)
    if key_file is not None:
        return read_key_file(key_file), str(key_file)
    if env_key:
        return parse_key(env_key, "store.key (SIDECAR_STORE_KEY)"), "SIDECAR_STORE_KEY"
    return None


def load_keyring(
    encryption: bool,
    key_file: Path | None,
    previous_key_file: Path | None,
    env_key: str,
    env: Mapping[str, str],
) -> Keyring | None:
    """The keys the store reads and writes with; None for a plaintext store with no key.
    A key configured while encryption is off still reads sealed blobs (turning it off
    does not make the store unreadable); new blobs are then written in plaintext."""
    found = current_key(key_file, env_key, env)
    if found is None:
        if encryption:
            raise FailedPrecondition(
                "store.encryption is on but no key is configured: set store.key_file "
                f"(make one with `sidecar models keygen -o PATH`), a systemd credential "
                f"named {CREDENTIAL}, or SIDECAR_STORE_KEY"
            )
        return None
    older = (
        (read_key_file(previous_key_file, "store.previous_key_file"),) if previous_key_file else ()
    )
    return Keyring(found[0], older)


def write_new_key(path: Path) -> str:
    """Write a new random key to `path` (mode 0600, never over an existing file); its id."""
    key = os.urandom(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise FailedPrecondition(f"{path} exists: a key is never overwritten") from None
    except OSError as e:
        raise FailedPrecondition(f"cannot write {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(key.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return key_id(key)
