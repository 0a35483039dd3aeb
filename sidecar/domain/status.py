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


@dataclass(frozen=True)
class SwapResult:
    old: ModelRef
    new: ModelRef
    strategy: str
    seconds: float
