"""Staged rollout: which daemons of a fleet take a version the origin offers to a share.

A fleet has no server that could hand out slots, only a static origin every daemon reads,
so each daemon decides for itself, the same way every time: its place in the rollout is

    position = int(sha256(f"{identity}|{model}|{version}")[:8 bytes], big-endian) / 2**64

a number in [0, 1), uniform over identities; it takes the version once the manifest's
`rollout` is above it. Raising the rollout therefore only adds daemons (a daemon in at 0.1
is in at 0.5) and never flips one back and forth. The version is hashed too, so the first
5% of one version are not the first 5% of every version: the canary load is spread over
the fleet. A model name has no '|' (names.py), so the text hashed is never ambiguous.

An operator can compute a machine's place by hand:
`printf '%s' 'IDENTITY|MODEL|VERSION' | sha256sum | cut -c1-16`, read as hex, over 2**64.
"""

from __future__ import annotations

import hashlib

from sidecar.domain.updates import Rollout

_SCALE = float(1 << 64)


def position(identity: str, model: str, version: int) -> float:
    """This daemon's place in the rollout of `version` of `model`: in [0, 1)."""
    digest = hashlib.sha256(f"{identity}|{model}|{version}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def rollout(identity: str, model: str, version: int, fraction: float) -> Rollout:
    """Where this daemon stands in the rollout of `version` published to `fraction`."""
    at = position(identity, model, version)
    return Rollout(version, fraction, at, at < fraction, identity)


def describe(r: Rollout) -> str:
    """Why a daemon outside the cohort does nothing (the check's detail)."""
    return (
        f"v{r.version} is published to {percent(r.fraction)} of daemons; this daemon is not in "
        f"the cohort yet (it joins once the rollout passes {percent(r.position)})"
    )


def percent(x: float) -> str:
    """0.4372 -> '43.72%', 0.25 -> '25%': two decimals, so a shown place can be typed back
    as a rollout that includes it (above it) or not."""
    return f"{100 * x:.2f}".rstrip("0").rstrip(".") + "%"
