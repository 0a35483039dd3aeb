"""The staged-rollout hash and this machine's identity: a documented formula, a share that
matches the fraction, monotone in the fraction, and an identity that stays put."""

from __future__ import annotations

import hashlib
from itertools import pairwise
from pathlib import Path

import pytest
from rollout_helpers import within_binomial

from sidecar.config import Overrides, load
from sidecar.domain.errors import ConfigError
from sidecar.update import cohort
from sidecar.update.identity import FILE, resolve

KNOWN = 4556629864083851660  # sha256("web-7|classifier|3"), its first 8 bytes
KNOWN_PERCENT = "24.7%"
IDS = [f"host-{i:05d}" for i in range(10_000)]
FRACTIONS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.99, 1.0)


def test_the_position_is_the_documented_formula() -> None:
    # Pinned so that an operator's `printf ... | sha256sum` stays right: changing the
    # formula would silently move every machine to another cohort.
    digest = hashlib.sha256(b"web-7|classifier|3").hexdigest()
    assert cohort.place("web-7", "classifier", 3) == int(digest[:16], 16)
    assert cohort.position("web-7", "classifier", 3) == int(digest[:16], 16) / 2**64
    # And a known value, so that the formula cannot drift together with the test above.
    assert cohort.place("web-7", "classifier", 3) == KNOWN
    assert cohort.percent(cohort.position("web-7", "classifier", 3)) == KNOWN_PERCENT


def test_the_last_places_are_in_at_1_and_compared_exactly() -> None:
    top = 2**64 - 1  # as a float over 2**64 this rounds to 1.0: "never in, even at 100%"
    assert top / 2**64 == 1.0
    assert cohort.included(top, 1.0)
    assert not cohort.included(top, 1 - 2**-53)
    assert cohort.included(2**63 - 1, 0.5) and not cohort.included(2**63, 0.5)
    assert not cohort.included(0, 0.0) and cohort.included(0, 1e-6)


def test_a_share_below_1_never_shows_as_100_percent() -> None:
    assert cohort.percent(0.99999) == "99.999%"
    assert cohort.percent(0.999999) == "99.9999%"
    assert cohort.percent(1.0) == "100%" and cohort.percent(0.0) == "0%"
    assert cohort.percent(0.000001) == "0.0001%"
    assert cohort.percent(0.5) == "50%"


def test_the_share_in_the_cohort_matches_the_fraction() -> None:
    for f in FRACTIONS:
        n = sum(cohort.rollout(i, "m", 2, f).in_cohort for i in IDS)
        assert within_binomial(n, len(IDS), f), (f, n)
    assert not any(cohort.rollout(i, "m", 2, 0.0).in_cohort for i in IDS)
    assert all(cohort.rollout(i, "m", 2, 1.0).in_cohort for i in IDS)


def test_raising_the_fraction_only_adds_daemons() -> None:
    cohorts = [{i for i in IDS if cohort.rollout(i, "m", 2, f).in_cohort} for f in FRACTIONS]
    for smaller, larger in pairwise(cohorts):
        assert smaller <= larger
    # And it does add: the checks above would pass on a hash that put everyone at 0.
    assert [len(c) for c in cohorts] == sorted({len(c) for c in cohorts})


def test_each_version_has_its_own_first_daemons() -> None:
    # The canaries of v2 are not the canaries of v3: about 10% of 10% overlap, not 10%.
    first = [{i for i in IDS if cohort.rollout(i, "m", v, 0.1).in_cohort} for v in (2, 3)]
    both = len(first[0] & first[1])
    assert within_binomial(both, len(IDS), 0.01), both
    models = [{i for i in IDS if cohort.rollout(i, name, 2, 0.1).in_cohort} for name in "ab"]
    assert models[0] != models[1]


def test_the_detail_says_where_the_daemon_will_join() -> None:
    r = cohort.rollout("web-7", "classifier", 3, 0.0)
    assert not r.in_cohort and r.identity == "web-7"
    text = cohort.describe(r)
    assert "not in the cohort yet" in text and cohort.percent(r.position) in text
    assert cohort.percent(0.25) == "25%" and cohort.percent(0.43721) == "43.72%"


# ---------------------------------------------------------------- identity


def test_a_configured_identity_wins(tmp_path: Path) -> None:
    mid = tmp_path / "machine-id"
    mid.write_text("0123456789abcdef0123456789abcdef\n")
    got = resolve("rack4-node12", tmp_path / "state", mid)
    assert (got.value, got.source) == ("rack4-node12", "update.identity")
    assert not (tmp_path / "state").exists()


def test_the_machine_id_is_used_hashed_never_as_it_is(tmp_path: Path) -> None:
    mid = tmp_path / "machine-id"
    raw = "0123456789abcdef0123456789abcdef"
    mid.write_text(raw + "\n")
    got = resolve("", tmp_path / "state", mid)
    assert got.source == str(mid) and raw not in got.value and len(got.value) == 32
    assert resolve("", tmp_path / "other", mid) == got  # stable: reinstalls keep it
    other = tmp_path / "machine-id-2"
    other.write_text("f" * 32)
    assert resolve("", tmp_path / "state", other).value != got.value


@pytest.mark.parametrize("content", [None, "", "not-a-machine-id", "uninitialized\n"])
def test_without_a_machine_id_a_random_id_is_kept_once(tmp_path: Path, content: str | None) -> None:
    mid = tmp_path / "machine-id"
    if content is not None:
        mid.write_text(content)
    state = tmp_path / "state"
    first = resolve("", state, mid)
    assert first.source == str(state / FILE) and len(first.value) == 32
    assert resolve("", state, mid) == first  # a restart keeps it
    assert resolve("", tmp_path / "elsewhere", mid).value != first.value
    assert not [p for p in state.iterdir() if p.name != FILE]  # no temp file left


def test_an_emptied_identity_file_is_chosen_again(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / FILE).write_text("\n")
    got = resolve("", state, tmp_path / "no-machine-id")
    assert got.value and (state / FILE).read_text().strip() == got.value


def test_a_random_id_once_chosen_stays_when_a_machine_id_appears(tmp_path: Path) -> None:
    # A first boot before systemd initialised /etc/machine-id: a random id is chosen; the
    # machine-id written later must not move the daemon to another cohort.
    mid, state = tmp_path / "machine-id", tmp_path / "state"
    mid.write_text("uninitialized\n")
    first = resolve("", state, mid)
    mid.write_text("0123456789abcdef0123456789abcdef\n")
    assert resolve("", state, mid) == first


def test_the_random_id_never_meets_a_model_called_identity(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "identity").mkdir(parents=True)  # that model's work folder
    (state / "identity" / "state.json").write_text("{}")
    got = resolve("", state, tmp_path / "no-machine-id")
    assert got.source == str(state / ".identity") and len(got.value) == 32
    assert (state / "identity" / "state.json").read_text() == "{}"


def test_an_unusable_id_file_falls_back_to_the_hostname_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    (state / FILE).mkdir(parents=True)  # unreadable as a file, and not replaceable
    got = resolve("", state, tmp_path / "no-machine-id")
    assert got.source.startswith("hostname (") and len(got.value) == 32
    assert resolve("", state, tmp_path / "no-machine-id") == got  # the same every time
    assert any("unusable" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (" web-7", "whitespace"),
        ("web-7\n", "whitespace"),
        ("a\tb", "control"),
        ("x" * 257, "at most 256"),
    ],
)
def test_a_bad_configured_identity_is_refused_naming_the_key(
    tmp_path: Path, value: str, says: str
) -> None:
    empty = tmp_path / "c.toml"
    empty.touch()
    with pytest.raises(ConfigError, match=r"update\.identity") as e:
        load(Overrides(config=empty), env={"SIDECAR_UPDATE_IDENTITY": value})
    assert says in str(e.value)
