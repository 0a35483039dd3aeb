"""Signed update manifests, in the spirit of The Update Framework.

An origin holds `<name>.manifest.json`::

    {"signed": {"_type": "sidecar-manifest", "spec": 1, "name": ..., "version": N,
                "sha256": ..., "size": ..., "full": {"path", "sha256", "size"},
                "deltas": [{"from_version", "to_version", "from_sha256", "to_sha256",
                            "path", "sha256", "size"}, ...],
                "versions": {"1": sha256, ...}, "created": iso, "expires": iso,
                "rollout_ppm": 250000},
     "signatures": [{"keyid": ..., "sig": base64(Ed25519(canonical(signed)))}]}

`rollout_ppm` is the share of daemons that take this version (see `cohort`), in parts per
million; absent means all. A rollout below all must say spec 2 and spec 2 must have one, so
a daemon too old to know the key refuses the manifest (and waits) instead of taking a
staged version at once; at all the manifest says spec 1 again and every daemon, old or
new, takes it. In Python the share is `Manifest.rollout`, a fraction (ppm / 10**6).

Parts per million, an integer, rather than a fraction: the signature covers canonical JSON
re-derived by the daemon, and languages print floats differently (Python `1e-05`, others
`0.00001`), so a float signed by a publisher in another language would not verify; every
other number in the document is an integer already. A millionth is finer than any fleet.

`canonical` is JSON with sorted keys, compact separators, UTF-8: what was signed is
re-derived from the parsed document, so whitespace or key order added in transit do not
matter, but any change of a value does. `verify` refuses, each with a reason label for
metrics: an oversized document, a bad signature, another model's manifest (mix-and-match),
an expired one (freeze attack), and a version older than one already trusted (rollback).
A publisher may re-publish the same version (to raise its rollout, or to renew its expiry):
its `created` time then moves forward, which is how a daemon tells a replayed older copy.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sidecar.fileio import fsync_dir, sha256_file, write_atomic

log = logging.getLogger("sidecar.update")

SPEC = 1
SPEC_ROLLOUT = 2  # a rollout below 1: daemons that cannot honour it must not read it
PPM = 1_000_000
KEY_PREFIX = "ed25519:"


class UpdateRejected(Exception):
    """An update refused for a security or integrity reason; `reason` is a metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# ---------------------------------------------------------------- keys


def generate_keypair() -> tuple[bytes, str]:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, public_text(key.public_key())


def public_text(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_PREFIX + base64.b64encode(raw).decode()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path} is not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def parse_public_key(text: str) -> Ed25519PublicKey:
    text = text.strip()
    if not text.startswith(KEY_PREFIX):
        raise ValueError(f"a public key looks like '{KEY_PREFIX}<base64>', got {text[:20]!r}")
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX) :], validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as e:
        raise ValueError(f"not a valid Ed25519 public key ({e})") from None


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# ---------------------------------------------------------------- the document


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class DeltaEntry:
    from_version: int
    to_version: int
    from_sha256: str
    to_sha256: str
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    sha256: str
    size: int
    full: FileEntry
    deltas: tuple[DeltaEntry, ...]
    versions: dict[int, str]
    expires: datetime
    created: datetime
    rollout: float = 1.0  # the share of daemons that take this version (cohort.py); ppm/10**6


def rollout_problem(value: object) -> str | None:
    """None if `value` is a rollout fraction (a number from 0 to 1, in millionths), else
    what is wrong."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number from 0 to 1, got {value!r}"
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        return f"must be from 0 to 1, got {value!r}"
    if abs(value * PPM - round(value * PPM)) > 1e-6:
        # Rounded it could become 1 (everyone) where the publisher meant "almost all".
        return f"must be a whole number of millionths (at most 6 decimals), got {value!r}"
    return None


def to_ppm(fraction: float) -> int:
    return round(fraction * PPM)


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _to_json(m: Manifest) -> dict[str, Any]:
    staged = m.rollout < 1.0
    doc: dict[str, Any] = {
        "_type": "sidecar-manifest",
        "spec": SPEC_ROLLOUT if staged else SPEC,
        "name": m.name,
        "version": m.version,
        "sha256": m.sha256,
        "size": m.size,
        "full": {"path": m.full.path, "sha256": m.full.sha256, "size": m.full.size},
        "deltas": [
            {
                "from_version": d.from_version,
                "to_version": d.to_version,
                "from_sha256": d.from_sha256,
                "to_sha256": d.to_sha256,
                "path": d.path,
                "sha256": d.sha256,
                "size": d.size,
            }
            for d in m.deltas
        ],
        "versions": {str(v): sha for v, sha in sorted(m.versions.items())},
        "created": m.created.isoformat(),
        "expires": m.expires.isoformat(),
    }
    if staged:
        doc["rollout_ppm"] = to_ppm(m.rollout)
    return doc


def _malformed(what: str) -> UpdateRejected:
    return UpdateRejected("malformed", f"manifest is malformed: {what}")


def _field(doc: Mapping[str, Any], key: str, kind: type) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _malformed(f"'{key}' must be {kind.__name__}")
    if isinstance(value, int) and value < 0:
        raise _malformed(f"'{key}' must not be negative")
    return value


def _sha(doc: Mapping[str, Any], key: str) -> str:
    value = _field(doc, key, str)
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise _malformed(f"'{key}' must be 64 lowercase hex digits")
    return str(value)


def _path(doc: Mapping[str, Any]) -> str:
    value = str(_field(doc, "path", str))
    parts = value.split("/")
    # An origin path must stay inside the origin: no absolute paths, no climbing out.
    if (
        not value
        or value.startswith("/")
        or "\\" in value
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise _malformed(f"path {value!r} must be relative, '/'-separated, without '..'")
    return value


def _time(doc: Mapping[str, Any], key: str) -> datetime:
    try:
        t = datetime.fromisoformat(_field(doc, key, str))
    except ValueError:
        raise _malformed(f"'{key}' must be an ISO 8601 time") from None
    if t.tzinfo is None:
        raise _malformed(f"'{key}' must carry a time zone")
    return t


def _from_json(doc: Any) -> Manifest:
    if not isinstance(doc, dict) or doc.get("_type") != "sidecar-manifest":
        raise _malformed("not a sidecar manifest")
    if doc.get("spec") not in (SPEC, SPEC_ROLLOUT):
        raise _malformed(
            f"spec {doc.get('spec')!r} is not supported (this daemon reads {SPEC} and "
            f"{SPEC_ROLLOUT})"
        )
    ppm = doc.get("rollout_ppm", PPM)
    if isinstance(ppm, bool) or not isinstance(ppm, int) or not 0 <= ppm <= PPM:
        raise _malformed(f"'rollout_ppm' must be an integer from 0 to {PPM}, got {ppm!r}")
    # The spec says whether a rollout is staged, so that an older daemon, which reads spec 1
    # only and ignores keys it does not know, can never take a staged version at once.
    if (ppm < PPM) != (doc["spec"] == SPEC_ROLLOUT):
        raise _malformed(
            f"spec {doc['spec']} with 'rollout_ppm' {ppm}: a rollout below {PPM} needs spec "
            f"{SPEC_ROLLOUT}, and spec {SPEC_ROLLOUT} needs one"
        )
    full = _field(doc, "full", dict)
    deltas = []
    for d in _field(doc, "deltas", list):
        if not isinstance(d, dict):
            raise _malformed("each delta must be an object")
        deltas.append(
            DeltaEntry(
                from_version=_field(d, "from_version", int),
                to_version=_field(d, "to_version", int),
                from_sha256=_sha(d, "from_sha256"),
                to_sha256=_sha(d, "to_sha256"),
                path=_path(d),
                sha256=_sha(d, "sha256"),
                size=_field(d, "size", int),
            )
        )
    versions: dict[int, str] = {}
    for v, sha in _field(doc, "versions", dict).items():
        if not str(v).isdigit():
            raise _malformed("'versions' keys must be version numbers")
        versions[int(v)] = _sha({"sha256": sha}, "sha256")
    return Manifest(
        name=_field(doc, "name", str),
        version=_field(doc, "version", int),
        sha256=_sha(doc, "sha256"),
        size=_field(doc, "size", int),
        full=FileEntry(_path(full), _sha(full, "sha256"), _field(full, "size", int)),
        deltas=tuple(deltas),
        versions=versions,
        expires=_time(doc, "expires"),
        created=_time(doc, "created"),
        rollout=ppm / PPM,
    )


# ---------------------------------------------------------------- sign / verify


def sign(manifest: Manifest, key: Ed25519PrivateKey) -> bytes:
    signed = _to_json(manifest)
    sig = key.sign(canonical(signed))
    doc = {
        "signed": signed,
        "signatures": [{"keyid": key_id(key.public_key()), "sig": base64.b64encode(sig).decode()}],
    }
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def verify(
    data: bytes,
    public: Ed25519PublicKey,
    *,
    name: str,
    installed_version: int | None,
    now: datetime | None = None,
    max_bytes: int = 1 << 20,
) -> Manifest:
    if len(data) > max_bytes:
        raise UpdateRejected(
            "too_large", f"manifest is {len(data)} bytes, over the {max_bytes} cap"
        )
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise _malformed(f"not JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("signed"), dict):
        raise _malformed("no 'signed' object")
    signed, sigs = doc["signed"], doc.get("signatures")
    if not isinstance(sigs, list):
        raise _malformed("no 'signatures' list")
    ours = key_id(public)
    payload = canonical(signed)
    good = False
    for s in sigs:
        if isinstance(s, dict) and s.get("keyid") == ours and isinstance(s.get("sig"), str):
            try:
                public.verify(base64.b64decode(s["sig"], validate=True), payload)
                good = True
                break
            except (InvalidSignature, ValueError):
                continue
    if not good:
        raise UpdateRejected(
            "signature",
            f"manifest signature does not verify with the trusted key {ours} "
            "(tampered, or signed by another key)",
        )
    m = _from_json(signed)
    if m.name != name:
        raise UpdateRejected(
            "wrong_name", f"manifest is for model {m.name!r}, not {name!r} (mix-and-match)"
        )
    now = now or datetime.now(timezone.utc)
    if m.expires <= now:
        raise UpdateRejected(
            "expired",
            f"manifest expired at {m.expires.isoformat()} (freeze attack, or the publisher "
            "must re-publish)",
        )
    if installed_version is not None and m.version <= installed_version:
        raise UpdateRejected(
            "rollback",
            f"manifest version {m.version} is not newer than {installed_version}, which this "
            "daemon already trusts (rollback attack)",
        )
    return m


# ---------------------------------------------------------------- publish


def read_delta_info(path: Path) -> Any:
    from sidecar.update.delta import read_delta_info as read

    return read(path)


def publish(
    origin: Path,
    *,
    name: str,
    version: int,
    key_path: Path,
    file: Path,
    expires_days: float = 30,
    deltas_dir: str = "deltas",
    rollout: float | None = None,
) -> Manifest:
    """Sign `version` of `name` (the full `file`, the deltas that lead to it) into the origin.

    `version` may equal the published one when `file` is the same: a re-publish that raises
    (or lowers) its rollout or renews its expiry. `rollout` None keeps the published share
    on a re-publish, so renewing an expiry never widens a staged rollout by accident, and
    means 1 for a new version. Everything is checked before a byte is written.
    """
    if rollout is not None and (problem := rollout_problem(rollout)):
        raise ValueError(f"rollout {problem}")
    key = load_private_key(key_path)
    manifest_path = origin / f"{name}.manifest.json"
    versions: dict[int, str] = {}
    sha = sha256_file(file)
    old: Manifest | None = None
    if manifest_path.exists():
        # The publisher's own file: read, not verified, so a new signing key can take over.
        try:
            old = _from_json(json.loads(manifest_path.read_bytes())["signed"])
        except (ValueError, KeyError, TypeError, UpdateRejected) as e:
            raise ValueError(f"{manifest_path} is not a readable manifest: {e}") from None
        if old.name != name:
            raise ValueError(f"{manifest_path} is for model {old.name!r}, not {name!r}")
        if version < old.version:
            raise ValueError(
                f"version {version} must be greater than the published {old.version} (or "
                "equal to it, to re-publish the same file)"
            )
        if version == old.version and sha != old.sha256:
            raise ValueError(
                f"version {version} is published already with another file "
                f"({old.sha256[:12]}); a new file needs a version greater than the published "
                f"{old.version}"
            )
        versions = dict(old.versions)
    origin.mkdir(parents=True, exist_ok=True)
    size = file.stat().st_size
    versions[version] = sha
    files = origin / "files"
    files.mkdir(exist_ok=True)
    target = files / f"{sha}.gguf"
    if not target.exists():
        tmp = target.with_name(target.name + ".partial")
        shutil.copyfile(file, tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        tmp.replace(target)
        fsync_dir(files)
    by_sha = {s: v for v, s in versions.items()}
    deltas = []
    for p in (
        sorted((origin / deltas_dir).glob("*.delta")) if (origin / deltas_dir).is_dir() else []
    ):
        try:
            info = read_delta_info(p)
        except Exception as e:
            log.warning("skipping %s: not a readable delta (%s)", p, e)
            continue
        frm, to = by_sha.get(info.base_sha256), by_sha.get(info.target_sha256)
        if frm is None or to is None:
            log.warning("skipping %s: its base or target is not a published version", p)
            continue
        deltas.append(
            DeltaEntry(
                frm,
                to,
                info.base_sha256,
                info.target_sha256,
                f"{deltas_dir}/{p.name}",
                sha256_file(p),
                p.stat().st_size,
            )
        )
    now = datetime.now(timezone.utc).replace(microsecond=0)
    if old is not None and old.version == version:
        # A daemon refuses a copy of this version created earlier than one it has read
        # (a replay that would hold the rollout back), so the new copy must be later.
        now = max(now, old.created + timedelta(seconds=1))
        rollout = old.rollout if rollout is None else rollout
    m = Manifest(
        name=name,
        version=version,
        sha256=sha,
        size=size,
        full=FileEntry(f"files/{sha}.gguf", sha, size),
        deltas=tuple(deltas),
        versions=versions,
        expires=now + timedelta(days=expires_days),
        created=now,
        rollout=1.0 if rollout is None else to_ppm(rollout) / PPM,  # as a daemon reads it
    )
    write_atomic(manifest_path, sign(m, key))
    return m
