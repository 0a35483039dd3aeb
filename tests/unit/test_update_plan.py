"""Choosing what to download: the cheapest delta chain from any held version, or the full file."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from sidecar.update.manifest import DeltaEntry, FileEntry, Manifest
from sidecar.update.plan import cheapest

FULL = 1000
V = {1: "a" * 64, 2: "b" * 64, 3: "c" * 64, 4: "d" * 64}


def delta(frm: int, to: int, size: int) -> DeltaEntry:
    return DeltaEntry(frm, to, V[frm], V[to], f"deltas/{frm}-{to}.delta", f"{frm}{to}" * 32, size)


def manifest(*deltas: DeltaEntry, version: int = 4) -> Manifest:
    now = datetime.now(timezone.utc)
    return Manifest(
        name="m",
        version=version,
        sha256=V[version],
        size=FULL,
        full=FileEntry(f"files/{V[version]}.gguf", V[version], FULL),
        deltas=tuple(deltas),
        versions=dict(V),
        expires=now + timedelta(days=1),
        created=now,
    )


@pytest.mark.parametrize(
    ("deltas", "held", "avoid", "want_steps", "want_bytes"),
    [
        # a direct delta from the serving version
        ([delta(3, 4, 10)], {V[3]}, (), [(3, 4)], 10),
        # no delta from what we hold: the full file
        ([delta(2, 4, 10)], {V[3]}, (), [], FULL),
        # a chain is cheaper than a big direct delta
        ([delta(2, 4, 500), delta(2, 3, 20), delta(3, 4, 30)], {V[2]}, (), [(2, 3), (3, 4)], 50),
        # the direct delta is cheaper than a chain
        ([delta(2, 4, 40), delta(2, 3, 20), delta(3, 4, 30)], {V[2]}, (), [(2, 4)], 40),
        # a delta bigger than the full file is not worth it
        ([delta(3, 4, 1500)], {V[3]}, (), [], FULL),
        # a chain that adds up past the full file is not worth it either
        ([delta(1, 2, 600), delta(2, 4, 600)], {V[1]}, (), [], FULL),
        # start from any held version, not only the serving one
        ([delta(1, 4, 15), delta(3, 4, 90)], {V[1], V[3]}, (), [(1, 4)], 15),
        # a delta that failed before is avoided: fall back to another path or the full file
        ([delta(3, 4, 10)], {V[3]}, ("34" * 32,), [], FULL),
        ([delta(3, 4, 10), delta(1, 4, 60)], {V[1], V[3]}, ("34" * 32,), [(1, 4)], 60),
    ],
)
def test_cheapest_path(deltas, held, avoid, want_steps, want_bytes) -> None:  # type: ignore[no-untyped-def]
    plan = cheapest(manifest(*deltas), held, avoid=frozenset(avoid))
    assert [(s.from_version, s.to_version) for s in plan.steps] == want_steps
    assert plan.full == (not want_steps)
    assert plan.download_bytes == want_bytes
    assert plan.full_bytes == FULL
    assert plan.target_sha256 == V[4]


def test_target_already_held_downloads_nothing() -> None:
    plan = cheapest(manifest(delta(3, 4, 10)), {V[3], V[4]})
    assert not plan.full and not plan.steps and plan.download_bytes == 0


def test_describe_names_the_chain_and_the_bytes() -> None:
    plan = cheapest(manifest(delta(2, 3, 20), delta(3, 4, 30)), {V[2]})
    assert plan.describe() == "delta v2 -> v3 -> v4 (50 of 1000 bytes)"
    assert cheapest(manifest(), {V[2]}).describe() == "full file (1000 bytes)"
