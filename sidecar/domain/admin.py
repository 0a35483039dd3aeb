"""What the Admin service reports: plain data the daemon fills and a front end renders.

The admin seam (`sidecar.domain.seam.Admin`) returns these; the gRPC servicer turns them
into protobuf, and nothing below the seam knows protobuf exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sidecar.domain.status import PoolStatus
from sidecar.domain.updates import Rollout
from sidecar.domain.versions import VersionInfo


@dataclass(frozen=True)
class AdapterReport:
    """One LoRA adapter of a model with an active version, as status shows it."""

    name: str
    version: str  # the active version's sha256 prefix
    last_update: str = ""  # its last update's outcome
    last_rollback: str = ""  # the last version probation swapped back, when and why
    not_fitting: str = ""  # why it does not fit the file its model serves now ("" = it fits)


@dataclass(frozen=True)
class ModelReport:
    """One model as `sidecar status` shows it: its pool, plus what the supervisor's probe
    and the updater know about it."""

    pool: PoolStatus
    is_default: bool
    probe_error: str | None = None  # the last real (one-token) probe's failure, if any
    last_update: str = ""  # the last update's outcome
    update_fetch: str = ""  # the update in flight ("" when none)
    rollout: Rollout | None = None  # this daemon in the origin's newest version's rollout
    last_rollback: str = ""  # the last version probation swapped back, when and why
    adapters: tuple[AdapterReport, ...] = ()


@dataclass(frozen=True)
class ResidencyChange:
    """What `sidecar load` / `sidecar unload` did: the model after it, whether anything
    changed, and how long it took."""

    model: ModelReport
    changed: bool
    seconds: float


@dataclass(frozen=True)
class CloudReport:
    """The cloud escalation's settings and state (the router fills it)."""

    configured: bool
    base_url: str
    model: str
    routing: str
    breaker: str
    spent_day: float
    spent_month: float
    daily_cap: float
    monthly_cap: float
    calls: int
    tasks: dict[str, str] = field(default_factory=dict)  # few-shot task -> preparation stage
    thresholds_file: str = ""  # fitted thresholds (sidecar eval --fit-threshold)
    fitted: dict[str, str] = field(default_factory=dict)  # key -> value and where it came from
    shadow: ShadowReport | None = None  # shadow traffic (cloud.shadow_rate)


@dataclass(frozen=True)
class ShadowAgreement:
    """How often the cloud agreed with the local answers of one key and model version."""

    key: str  # task:NAME | classify:MODEL | extract:MODEL
    model: str  # name@version that answered locally
    agreed: int
    total: int
    low: float  # Wilson 95% interval of agreed / total
    high: float


@dataclass(frozen=True)
class ShadowReport:
    rate: float
    daily_cap: float  # 0 = no cap
    spent_day: float
    spent_month: float
    counts: dict[str, int]  # sent, dropped, capped, failed
    agreement: tuple[ShadowAgreement, ...]
    directory: str  # where agreement and disagreements are kept
    # "task:NAME (model@version)" -> the threshold chosen from shadow pairs (target_accuracy)
    # and from how many, or why none is yet
    recalibrated: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StatusReport:
    pid: int
    uptime_s: float
    socket: str
    models: tuple[ModelReport, ...]
    counters: dict[str, int]  # requests by "<rpc>.<status>"
    memory_available: int
    shedding: str  # why new work is refused under memory pressure ("" = it is not)
    last_reload: str
    cloud: CloudReport | None
    drop_watcher: str  # the drop folder watcher's health ("" = no drop folder configured)


@dataclass(frozen=True)
class StoredVersion:
    """A stored version and whether a pool serves it now."""

    info: VersionInfo
    serving: bool
    not_fitting: str = ""  # an active adapter version: why it does not fit its model now


@dataclass(frozen=True)
class StoreListing:
    root: Path
    versions: tuple[StoredVersion, ...]
