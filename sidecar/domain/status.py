"""What the running daemon reports about its models: plain data for status and replies."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sidecar.domain.types import ModelRef


@dataclass
class SlotInfo:
    pid: int | None
    state: str  # starting | idle | busy | dead | stopped
    requests: int


@dataclass(frozen=True)
class PoolStatus:
    model: ModelRef
    path: Path
    context: int
    threads: int
    workers: tuple[SlotInfo, ...]
    queue_depth: int
    queue_limit: int
    ready: bool
    detail: str
    restarts: int
    backoff_s: float
    last_error: str
    last_swap: str
    rss: tuple[int | None, ...]
    # Residency (load on demand, keep-alive): loaded | loading | unloading | unloaded.
    state: str = "loaded"
    on_demand: bool = False
    in_flight: int = 0  # requests queued or running
    idle_s: float = 0.0  # since the last request ended (0 while one runs or unloaded)
    unload_in_s: float = -1.0  # until idleness unloads it; -1 = not scheduled
    footprint: int = 0  # bytes it takes loaded, as the memory budget estimates it
    adapters: tuple[str, ...] = ()  # its LoRA adapters with an active version, by name


@dataclass(frozen=True)
class SwapResult:
    old: ModelRef
    new: ModelRef
    strategy: str
    seconds: float
    # The model's active adapters that do not fit the new file, as "ADAPTER: why" (a swap
    # of a model proceeds: requests for these fail fast until a fitting version is added).
    adapters_not_fitting: tuple[str, ...] = ()

    def misfit_note(self) -> str:
        """ "; adapters that do not fit it: ADAPTER: why; ..." ("" = every one fits): what
        each report of the swap (its reply, status, a drop or an update record) appends."""
        if not self.adapters_not_fitting:
            return ""
        return f"; adapters that do not fit it: {'; '.join(self.adapters_not_fitting)}"
