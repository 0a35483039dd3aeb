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

_SCALE = 1 << 64
_BELOW_ONE = 1.0 - 2.0**-53  # the largest float below 1


def place(identity: str, model: str, version: int) -> int:
    """The exact place: the hash's first 8 bytes as an integer in [0, 2**64)."""
    digest = hashlib.sha256(f"{identity}|{model}|{version}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def position(identity: str, model: str, version: int) -> float:
    """This daemon's place in the rollout of `version` of `model`, in [0, 1), for display:
    a 64-bit place divided as a float can round up to 1.0, so it is kept below."""
    return min(place(identity, model, version) / _SCALE, _BELOW_ONE)


def included(at: int, fraction: float) -> bool:
    """Whether the place `at` (from `place`) is in a rollout to `fraction`. Compared
    exactly (a float times 2**64 is exact, and Python compares int with float exactly), so
    no place rounds up onto the fraction; at 1 every place is in."""
    return fraction >= 1 or at < fraction * _SCALE


def rollout(identity: str, model: str, version: int, fraction: float) -> Rollout:
    """Where this daemon stands in the rollout of `version` published to `fraction`."""
    at = place(identity, model, version)
    return Rollout(version, fraction, min(at / _SCALE, _BELOW_ONE), included(at, fraction),
                   identity)  # fmt: skip


def describe(r: Rollout) -> str:
    """Why a daemon outside the cohort does nothing (the check's detail)."""
    return (
        f"v{r.version} is published to {percent(r.fraction)} of daemons; this daemon is not in "
        f"the cohort yet (it joins once the rollout passes {percent(r.position)})"
    )


def percent(x: float) -> str:
    """0.4372 -> '43.72%', 0.25 -> '25%': two decimals, so a shown place can be typed back
    as a rollout that includes it (above it) or not; more where two would round a share
    below 1 up to '100%' (or above 0 down to '0%'), which would read as a finished rollout
    while it is still staged."""
    for places in (2, 4, 6, 8, 10):
        text = f"{100 * x:.{places}f}"
        if (x >= 1 or float(text) < 100) and (x <= 0 or float(text) > 0):
            break
    return text.rstrip("0").rstrip(".") + "%"
