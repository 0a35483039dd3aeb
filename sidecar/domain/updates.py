"""What an update check finds and what an applied update did: plain data for replies.

The updater reads a signed manifest and plans downloads; front ends only need the figures
below, so they never see the manifest or the plan themselves.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rollout:
    """Where this daemon stands in the staged rollout of the version an origin offers."""

    version: int  # the manifest's version
    fraction: float  # the share of daemons it is published to, 0 to 1
    position: float  # this daemon's place in [0, 1): it takes the version once fraction > it
    in_cohort: bool
    identity: str  # the machine identity hashed (update.identity, or derived)


@dataclass(frozen=True)
class Check:
    model: str
    installed_version: int  # 0: the serving file is no version the manifest names
    available_version: int  # the manifest's version
    update_available: bool  # False: nothing to do (see detail)
    plan_text: str  # how it would download ("" when nothing to do)
    download_bytes: int
    full_bytes: int  # the size of the whole new file
    detail: str
    rollout: Rollout | None = None


@dataclass(frozen=True)
class Outcome:
    model: str
    from_version: int
    to_version: int
    new_version: str  # the sha256 prefix that serves now
    plan: str  # how it came (or why nothing was done)
    fetched_bytes: int
    full_bytes: int
    installed: bool
