"""SIGHUP: re-read the configuration, apply what can change live, report the rest.

`diff` is pure (table-tested) and walks every field of `Config`, section by section, so a
section or key added to the schema is diffed without being listed here: its change is
applied if its key is in `LIVE`, and otherwise named as needing a restart, in the log and
in `sidecar status`. Nothing is silently dropped; an invalid new file changes nothing.
`merge_live` gives the config the daemon runs with afterwards; `server/daemon.py` hands
it to the running parts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

from sidecar.config import Config

# Keys whose new value the running daemon uses without a restart: each is read where it is
# used (per request, per swap, per supervisor tick), never baked into something built at
# start. `models.*` and `tasks.*` stand for every name.
LIVE = frozenset(
    {
        "log.format",
        "log.level",
        "server.default_max_tokens",
        "server.max_labels",
        "server.max_embed_texts",
        "server.grace_seconds",
        "server.ping_interval_seconds",
        "server.hang_seconds",
        "server.probe_interval_seconds",
        "server.min_available_mb",
        "models.*.max_queue",
        "models.*.max_rss_mb",
        "models.*.update_origin",
        "models.*.update_key",
        "update.interval_seconds",
        "update.healthy_seconds",
        "update.timeout_seconds",
        "update.retries",
        "update.fetch_deadline_seconds",
        "update.fetch_min_bytes_per_second",
        "store.auto_swap",
        "store.swap_strategy",
        "store.drain_seconds",
        "store.swap_wait_seconds",
        # The routing decision's inputs. The endpoint, key, retries, breaker, budget and
        # privacy detectors are built once at start: they need a restart.
        "cloud.routing",
        "cloud.local_timeout_seconds",
        "cloud.classify_threshold",
        "cloud.classify_margin",
        "cloud.extract_mean_logprob",
        "cloud.generate_mean_logprob",
        "cloud.generate_min_logprob",
        "cloud.pre_route_max_chars",
        "cloud.pre_route_keywords",
        "cloud.pre_route_tasks",
        # A task's examples are embedded and fitted at start; its threshold is read per request.
        "tasks.*.threshold",
    }
)

# Fields of Config that record where the settings came from, not a setting.
NOT_SETTINGS = frozenset({"source"})


@dataclass(frozen=True)
class Change:
    key: str  # as in the TOML: "server.max_labels", "models.NAME.workers", "tasks.NAME"
    old: Any
    new: Any
    shape: str = ""  # the key with the name as `*` ("models.*.workers"); "" = the key itself

    @property
    def live(self) -> bool:
        return (self.shape or self.key) in LIVE


def _named(entries: tuple[Any, ...]) -> bool:
    """A [section.NAME] table list (models, tasks) rather than a plain tuple value."""
    return bool(entries) and all(is_dataclass(e) and hasattr(e, "name") for e in entries)


def _section(prefix: str, shape: str, old: Any, new: Any) -> list[Change]:
    return [
        Change(
            f"{prefix}.{f.name}", getattr(old, f.name), getattr(new, f.name), f"{shape}.{f.name}"
        )
        for f in fields(old)
        if f.name != "name" and getattr(old, f.name) != getattr(new, f.name)
    ]


def diff(old: Config, new: Config) -> list[Change]:
    changes: list[Change] = []
    for f in fields(old):
        if f.name in NOT_SETTINGS:
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if is_dataclass(a):
            changes += _section(f.name, f.name, a, b)
        elif isinstance(a, tuple) and _named(a + b):
            olds, news = {e.name: e for e in a}, {e.name: e for e in b}
            for name in sorted(olds.keys() | news.keys()):
                x, y = olds.get(name), news.get(name)
                if x is None or y is None:  # a table added or removed: a restart builds it
                    changes.append(Change(f"{f.name}.{name}", x, y, f"{f.name}.*"))
                else:
                    changes += _section(f"{f.name}.{name}", f"{f.name}.*", x, y)
        elif a != b:
            changes.append(Change(f.name, a, b))
    return changes


def _take(old: Any, new: Any, prefix: str, live: set[str]) -> Any:
    picked = {f.name: getattr(new, f.name) for f in fields(old) if f"{prefix}.{f.name}" in live}
    return replace(old, **picked) if picked else old


def merge_live(old: Config, new: Config, changes: list[Change]) -> Config:
    """The config the daemon runs with after the reload: old, plus the live changes."""
    live = {c.key for c in changes if c.live}
    merged: dict[str, Any] = {}
    for f in fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if is_dataclass(a):
            merged[f.name] = _take(a, b, f.name, live)
        elif isinstance(a, tuple) and _named(a):
            news = {e.name: e for e in b}
            merged[f.name] = tuple(
                _take(e, news[e.name], f"{f.name}.{e.name}", live) if e.name in news else e
                for e in a
            )
        elif f.name in live:
            merged[f.name] = b
    return replace(old, **merged)


def summary(changes: list[Change]) -> str:
    if not changes:
        return "no changes"
    applied = [c.key for c in changes if c.live]
    pending = [c.key for c in changes if not c.live]
    parts = []
    if applied:
        parts.append("applied: " + ", ".join(applied))
    if pending:
        parts.append("need a restart (not applied): " + ", ".join(pending))
    return "; ".join(parts)
