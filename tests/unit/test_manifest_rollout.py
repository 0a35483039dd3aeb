"""`rollout` in the signed manifest: written and read back, absent = 1 (old manifests keep
working), a bad value refused with a reason, and re-publishing the same version to raise it."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from rollout_helpers import signed_over
from test_manifest import NOW, manifest

from sidecar.update.manifest import (
    SPEC,
    SPEC_ROLLOUT,
    UpdateRejected,
    _to_json,
    canonical,
    publish,
    sign,
    verify,
)


def test_a_staged_manifest_says_spec_2_and_a_full_one_reads_as_before(keys) -> None:  # type: ignore[no-untyped-def]
    priv, pub, *_ = keys
    staged = sign(manifest(rollout=0.25), priv)
    assert json.loads(staged)["signed"]["spec"] == SPEC_ROLLOUT
    assert json.loads(staged)["signed"]["rollout_ppm"] == 250_000
    assert verify(staged, pub, name="demo", installed_version=1, now=NOW).rollout == 0.25
    # At 1 the document is exactly what a daemon without rollout support reads: spec 1, no
    # rollout key; and a manifest without the key means everyone.
    full = json.loads(sign(manifest(), priv))["signed"]
    assert full["spec"] == SPEC and "rollout_ppm" not in full
    assert verify(sign(manifest(), priv), pub, name="demo", installed_version=1,
                  now=NOW).rollout == 1.0  # fmt: skip


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (-1, "got -1"),
        (1_000_001, "got 1000001"),
        ("abc", "got 'abc'"),
        (True, "got True"),
        (None, "got None"),
        (0.5, "got 0.5"),
        ([1], "got [1]"),
    ],
)
def test_a_bad_rollout_in_a_signed_manifest_is_refused_with_its_reason(keys, value, says) -> None:  # type: ignore[no-untyped-def]
    priv, pub, *_ = keys
    signed = _to_json(manifest(rollout=0.5))
    signed["rollout_ppm"] = value
    with pytest.raises(UpdateRejected) as e:
        verify(signed_over(signed, priv), pub, name="demo", installed_version=1, now=NOW)
    assert e.value.reason == "malformed"
    assert f"'rollout_ppm' must be an integer from 0 to 1000000, {says}" in e.value.message


@pytest.mark.parametrize(
    ("spec", "ppm"),
    [
        (SPEC, 500_000),  # an older daemon would take a staged version at once
        (SPEC, 0),
        (SPEC_ROLLOUT, None),  # staged, but to whom?
        (SPEC_ROLLOUT, 1_000_000),
    ],
)
def test_a_staged_rollout_and_spec_2_go_together(keys, spec: int, ppm: int | None) -> None:  # type: ignore[no-untyped-def]
    priv, pub, *_ = keys
    signed = _to_json(manifest())
    signed["spec"] = spec
    if ppm is not None:
        signed["rollout_ppm"] = ppm
    with pytest.raises(UpdateRejected) as e:
        verify(signed_over(signed, priv), pub, name="demo", installed_version=1, now=NOW)
    assert e.value.reason == "malformed" and "needs spec 2" in e.value.message
    # Spec 1 saying "everyone" out loud is what it means anyway.
    signed = _to_json(manifest()) | {"rollout_ppm": 1_000_000}
    assert verify(signed_over(signed, priv), pub, name="demo", installed_version=1,
                  now=NOW).rollout == 1.0  # fmt: skip


def test_the_signed_share_is_an_integer_so_any_language_signs_the_same_bytes(keys) -> None:  # type: ignore[no-untyped-def]
    priv, pub, *_ = keys
    # Python prints 0.00001 as 1e-05, JavaScript as 0.00001: a float here would make the
    # canonical bytes depend on the publisher's language.
    signed = _to_json(manifest(rollout=0.00001))
    assert signed["rollout_ppm"] == 10 and b"e-" not in canonical(signed)
    m = verify(signed_over(signed, priv), pub, name="demo", installed_version=1, now=NOW)
    assert m.rollout == 0.00001


def test_an_unknown_spec_is_still_refused(keys) -> None:  # type: ignore[no-untyped-def]
    priv, pub, *_ = keys
    signed = _to_json(manifest())
    signed["spec"] = 3
    with pytest.raises(UpdateRejected, match="spec 3 is not supported"):
        verify(signed_over(signed, priv), pub, name="demo", installed_version=1, now=NOW)


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


def test_a_share_finer_than_a_millionth_is_refused_not_rounded_to_everyone(
    keys, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    _priv, _pub, key, _ = keys
    origin, a, _b = _origin(tmp_path)
    with pytest.raises(ValueError, match="whole number of millionths"):
        publish(origin, name="demo", version=1, key_path=key, file=a, rollout=0.9999999)
    assert not origin.exists()
    m = publish(origin, name="demo", version=1, key_path=key, file=a, rollout=0.29)
    assert m.rollout == 0.29 and json.loads((origin / "demo.manifest.json").read_bytes())[
        "signed"]["rollout_ppm"] == 290_000  # fmt: skip


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
