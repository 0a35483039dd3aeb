"""Residency: which models are loaded, and which to unload. Pure policy, no I/O.

A configured model is either loaded at start (`load = "at_start"`, the default) or on
demand (`load = "on_demand"`): then the daemon starts without it, the first request loads
it (and waits for the load), and it is unloaded after `keep_alive` seconds with nothing
queued or running. With a memory budget (`server.max_model_memory_mb`), loading a model
first unloads the least recently used idle models until the new one fits; a model with
requests in flight is never chosen. The engine (`local.PoolEngine`) applies what these
functions decide; the numbers it hands them are `Resident` snapshots of its pools.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sidecar.domain.errors import FailedPrecondition, Overloaded

MiB = 1024 * 1024
NEVER = -1.0  # unload_in: no idle unload is scheduled

# A pool's residency state, as status shows it.
LOADED, LOADING, UNLOADING, UNLOADED = "loaded", "loading", "unloading", "unloaded"
HOLDS_MEMORY = (LOADED, LOADING, UNLOADING)


@dataclass(frozen=True)
class Resident:
    name: str
    state: str  # loaded | loading | unloading | unloaded
    on_demand: bool
    keep_alive_s: float  # 0 = never unloaded for idleness
    last_used: float  # monotonic seconds: the last request's arrival or end
    in_flight: int  # requests queued or running
    footprint: int  # bytes it takes (estimated) while loaded
    busy: bool = False  # a load, unload or swap of it is under way


def idle_s(r: Resident, now: float) -> float:
    """Seconds since its last request ended; 0 while one is in flight or it is not loaded."""
    if r.state != LOADED or r.in_flight:
        return 0.0
    return max(0.0, now - r.last_used)


def unload_in(r: Resident, now: float) -> float:
    """Seconds until idleness unloads it (0 = due now), or NEVER when none is scheduled:
    loaded at start, keep_alive 0, not loaded."""
    if r.state != LOADED or not r.on_demand or r.keep_alive_s <= 0:
        return NEVER
    return max(0.0, r.keep_alive_s - idle_s(r, now))


def expired(residents: Iterable[Resident], now: float) -> list[str]:
    """The models idle past their keep_alive, oldest first."""
    due = [r for r in residents if not r.busy and not r.in_flight and unload_in(r, now) == 0.0]
    return [r.name for r in sorted(due, key=lambda r: r.last_used)]


def make_room(residents: Iterable[Resident], name: str, need: int, budget_mb: int) -> list[str]:
    """What to unload, least recently used first, so that `name` (needing `need` bytes) fits
    in the budget beside what stays. Raises FailedPrecondition when it could never fit and
    Overloaded when what holds the memory is busy now (retry later)."""
    if budget_mb <= 0:
        return []
    budget = budget_mb * MiB
    if need > budget:
        raise FailedPrecondition(
            f"model {name!r} needs ~{need / MiB:.1f} MiB, more than "
            f"server.max_model_memory_mb ({budget_mb}) allows"
        )
    holding = [r for r in residents if r.name != name and r.state in HOLDS_MEMORY]
    used = sum(r.footprint for r in holding)
    evict: list[str] = []
    candidates = sorted(
        (r for r in holding if r.state == LOADED and not r.in_flight and not r.busy),
        key=lambda r: r.last_used,
    )
    for r in candidates:
        if used + need <= budget:
            break
        evict.append(r.name)
        used -= r.footprint
    if used + need > budget:
        busy = sorted(r.name for r in holding if r.name not in evict)
        raise Overloaded(
            f"model {name!r} needs ~{need / MiB:.1f} MiB but server.max_model_memory_mb "
            f"({budget_mb}) is held by models with requests in flight ({', '.join(busy)}): "
            "retry in a few seconds"
        )
    return evict
