"""`rollout` in the signed manifest: written and read back, absent = 1 (old manifests keep
working), a bad value refused with a reason, and re-publishing the same version to raise it."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from test_manifest import NOW, manifest

from sidecar.update.manifest import (
    SPEC,
    SPEC_ROLLOUT,
    UpdateRejected,
    _to_json,
    canonical,
    generate_keypair,
    key_id,
    load_private_key,
    parse_public_key,
    publish,
    sign,
    verify,
)


@pytest.fixture
def keys(tmp_path: Path):  # type: ignore[no-untyped-def]
    private, public = generate_keypair()
    path = tmp_path / "k.pem"
    path.write_bytes(private)
    return load_private_key(path), parse_public_key(public), path, public


def _signed(signed: dict[str, Any], priv) -> bytes:  # type: ignore[no-untyped-def]
    """A manifest signed over exactly `signed`, whatever it holds (a publisher bug)."""
    sig = base64.b64encode(priv.sign(canonical(signed))).decode()
    doc = {"signed": signed, "signatures": [{"keyid": key_id(priv.public_key()), "sig": sig}]}
    return json.dumps(doc).encode()


def test_a_staged_manifest_says_spec_2_and_a_full_one_reads_as_before(keys) -> None:  # type: ignore[no-untyped-def]
    priv, pub, *_ = keys
    staged = sign(manifest(rollout=0.25), priv)
    assert json.loads(staged)["signed"]["spec"] == SPEC_ROLLOUT
    assert verify(staged, pub, name="demo", installed_version=1, now=NOW).rollout == 0.25
    # At 1 the document is exactly what a daemon without rollout support reads: spec 1, no
    # rollout key; and a manifest without the key means everyone.
    full = json.loads(sign(manifest(), priv))["signed"]
    assert full["spec"] == SPEC and "rollout" not in full
    assert verify(sign(manifest(), priv), pub, name="demo", installed_version=1,
                  now=NOW).rollout == 1.0  # fmt: skip


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (-0.1, "from 0 to 1, got -0.1"),
        (1.5, "from 0 to 1, got 1.5"),
        ("abc", "a number from 0 to 1, got 'abc'"),
        (True, "a number"),
        (None, "a number"),
        (float("nan"), "from 0 to 1, got nan"),
        ([0.5], "a number"),
    ],
)
def test_a_bad_rollout_in_a_signed_manifest_is_refused_with_its_reason(keys, value, says) -> None:  # type: ignore[no-untyped-def]
    priv, pub, *_ = keys
    signed = _to_json(manifest(rollout=0.5))
    signed["rollout"] = value
    with pytest.raises(UpdateRejected) as e:
        verify(_signed(signed, priv), pub, name="demo", installed_version=1, now=NOW)
    assert e.value.reason == "malformed"
    assert f"'rollout' must be {says}" in e.value.message


def test_an_unknown_spec_is_still_refused(keys) -> None:  # type: ignore[no-untyped-def]
    priv, pub, *_ = keys
    signed = _to_json(manifest())
    signed["spec"] = 3
    with pytest.raises(UpdateRejected, match="spec 3 is not supported"):
        verify(_signed(signed, priv), pub, name="demo", installed_version=1, now=NOW)


def _origin(tmp_path: Path) -> tuple[Path, Path, Path]:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"A" * 100)
    b.write_bytes(b"B" * 200)
    return tmp_path / "origin", a, b


def test_republishing_the_same_version_raises_its_rollout_and_moves_created(
    keys, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    _priv, _pub, key, _ = keys
    origin, a, b = _origin(tmp_path)
    publish(origin, name="demo", version=1, key_path=key, file=a)
    v2 = publish(origin, name="demo", version=2, key_path=key, file=b, rollout=0.1)
    raised = publish(origin, name="demo", version=2, key_path=key, file=b, rollout=0.5)
    assert (raised.version, raised.sha256, raised.rollout) == (2, v2.sha256, 0.5)
    # Strictly later, even within the same second: daemons refuse an earlier copy.
    assert raised.created >= v2.created + timedelta(seconds=1)
    assert raised.versions == v2.versions
    # Renewing the expiry without --rollout keeps the share: it never widens by accident.
    renewed = publish(origin, name="demo", version=2, key_path=key, file=b, expires_days=60)
    assert renewed.rollout == 0.5 and renewed.created > raised.created
    # A new version starts at everyone unless told.
    assert publish(origin, name="demo", version=3, key_path=key, file=a).rollout == 1.0


def test_republishing_a_version_with_another_file_or_an_older_one_is_refused(
    keys, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    _priv, _pub, key, _ = keys
    origin, a, b = _origin(tmp_path)
    publish(origin, name="demo", version=1, key_path=key, file=a)
    publish(origin, name="demo", version=2, key_path=key, file=b, rollout=0.1)
    before = (origin / "demo.manifest.json").read_bytes()
    with pytest.raises(ValueError, match="published already with another file"):
        publish(origin, name="demo", version=2, key_path=key, file=a, rollout=0.9)
    with pytest.raises(ValueError, match="must be greater than the published 2"):
        publish(origin, name="demo", version=1, key_path=key, file=a)
    assert (origin / "demo.manifest.json").read_bytes() == before


@pytest.mark.parametrize("bad", [2.0, -0.1, float("nan"), float("inf")])
def test_a_bad_rollout_is_refused_before_anything_is_written(
    keys, tmp_path: Path, bad: float
) -> None:  # type: ignore[no-untyped-def]
    _priv, _pub, key, _ = keys
    origin, a, b = _origin(tmp_path)
    publish(origin, name="demo", version=1, key_path=key, file=a)
    before = {p: p.read_bytes() for p in origin.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="rollout must be from 0 to 1"):
        publish(origin, name="demo", version=2, key_path=key, file=b, rollout=bad)
    assert {p: p.read_bytes() for p in origin.rglob("*") if p.is_file()} == before


def test_the_cli_publishes_a_rollout_and_refuses_a_bad_one_keeping_the_origin(
    keys, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    from sidecar.cli.commands import main

    _priv, _pub, key, _ = keys
    origin, a, _b = _origin(tmp_path)
    args = ["update", "publish", str(origin), "--name", "demo", "--version", "1",
            "--file", str(a), "--key", str(key)]  # fmt: skip
    ok = CliRunner().invoke(main, [*args, "--rollout", "0.25"])
    assert ok.exit_code == 0 and "rollout 25%" in ok.output, ok.output
    before = (origin / "demo.manifest.json").read_bytes()
    bad = CliRunner().invoke(main, [*args, "--rollout", "2"])
    assert bad.exit_code == 1 and "error: rollout must be from 0 to 1, got 2.0" in bad.output
    typo = CliRunner().invoke(main, [*args, "--rollout", "abc"])
    assert typo.exit_code == 2 and "'abc' is not a valid float" in typo.output, typo.output
    assert (origin / "demo.manifest.json").read_bytes() == before
    raised = CliRunner().invoke(main, [*args, "--rollout", "0.5"])
    assert raised.exit_code == 0 and "rollout 50%" in raised.output, raised.output
