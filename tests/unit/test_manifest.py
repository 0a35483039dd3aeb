"""Signed manifests: round trip, and each refusal with its reason label."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from sidecar.update.manifest import (
    FileEntry,
    Manifest,
    UpdateRejected,
    generate_keypair,
    key_id,
    parse_public_key,
    publish,
    sign,
    verify,
)

SHA = "ab" * 32
NOW = datetime(2026, 11, 23, tzinfo=timezone.utc)


def manifest(**kw: object) -> Manifest:
    fields: dict[str, object] = {
        "name": "demo",
        "version": 2,
        "sha256": SHA,
        "size": 10,
        "full": FileEntry(f"files/{SHA}.gguf", SHA, 10),
        "deltas": (),
        "versions": {1: "cd" * 32, 2: SHA},
        "expires": NOW + timedelta(days=1),
        "created": NOW,
    }
    return Manifest(**(fields | kw))  # type: ignore[arg-type]


def test_round_trip(keys) -> None:  # type: ignore[no-untyped-def]
    priv, pub, _path, text = keys
    data = sign(manifest(), priv)
    m = verify(data, pub, name="demo", installed_version=1, now=NOW)
    assert m == manifest()
    assert text.startswith("ed25519:") and len(key_id(pub)) == 16
    # Whitespace and key order added in transit do not matter; values do.
    assert verify(json.dumps(json.loads(data)).encode(), pub, name="demo",
                  installed_version=None, now=NOW) == m  # fmt: skip


def _reason(data: bytes, pub, **kw: object) -> str:  # type: ignore[no-untyped-def]
    args: dict[str, object] = {"name": "demo", "installed_version": 1, "now": NOW} | kw
    with pytest.raises(UpdateRejected) as e:
        verify(data, pub, **args)  # type: ignore[arg-type]
    return e.value.reason


def test_tampered_value_is_a_signature_failure(keys) -> None:  # type: ignore[no-untyped-def]
    priv, pub, *_ = keys
    doc = json.loads(sign(manifest(), priv))
    doc["signed"]["size"] = 11
    assert _reason(json.dumps(doc).encode(), pub) == "signature"


def test_another_key_is_a_signature_failure(keys) -> None:  # type: ignore[no-untyped-def]
    _priv, pub, *_ = keys
    other, _ = generate_keypair()
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(other, None)
    assert _reason(sign(manifest(), key), pub) == "signature"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "verify_kw", "reason"),
    [
        ({"expires": NOW - timedelta(seconds=1)}, {}, "expired"),
        ({"version": 1}, {}, "rollback"),
        ({"version": 2}, {"installed_version": 2}, "rollback"),
        ({"name": "other"}, {}, "wrong_name"),
        ({"full": FileEntry("../etc/passwd", SHA, 10)}, {}, "malformed"),
        ({"full": FileEntry("/abs", SHA, 10)}, {}, "malformed"),
        ({"sha256": "XYZ"}, {}, "malformed"),
    ],
)
def test_refusals_name_their_reason(keys, kw, verify_kw, reason) -> None:  # type: ignore[no-untyped-def]
    priv, pub, *_ = keys
    assert _reason(sign(manifest(**kw), priv), pub, **verify_kw) == reason


def test_oversized_and_garbage_documents(keys) -> None:  # type: ignore[no-untyped-def]
    _priv, pub, *_ = keys
    assert _reason(b" " * 2000, pub, max_bytes=1000) == "too_large"
    assert _reason(b"not json", pub) == "malformed"
    assert _reason(b'{"signed": 1}', pub) == "malformed"


def test_bad_public_keys_are_explained() -> None:
    with pytest.raises(ValueError, match="ed25519:"):
        parse_public_key("ssh-ed25519 AAAA")
    with pytest.raises(ValueError, match="not a valid Ed25519"):
        parse_public_key("ed25519:AAAA")


def test_publish_keeps_history_and_refuses_an_older_version(keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _priv, pub, path, _text = keys
    origin = tmp_path / "origin"
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"A" * 100)
    b.write_bytes(b"B" * 200)
    m1 = publish(origin, name="demo", version=1, key_path=path, file=a)
    m2 = publish(origin, name="demo", version=2, key_path=path, file=b)
    assert (origin / m2.full.path).read_bytes() == b.read_bytes()
    assert m2.versions == {1: m1.sha256, 2: m2.sha256}
    on_disk = verify((origin / "demo.manifest.json").read_bytes(), pub, name="demo",
                     installed_version=1)  # fmt: skip
    assert on_disk.version == 2 and on_disk.size == 200
    with pytest.raises(ValueError, match="greater than the published 2"):
        publish(origin, name="demo", version=2, key_path=path, file=a)
