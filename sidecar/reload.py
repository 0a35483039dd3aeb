"""SIGHUP: re-read the configuration, apply what can change live, report the rest.

`diff` is pure (table-tested); `apply` changes the running daemon's objects. A key
that needs a restart is named in the log and in `sidecar status`, never silently
dropped; an invalid new file changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from sidecar.config import Config

# Keys whose new value the daemon can use without restarting anything.
LIVE = {
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
}


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    @property
    def live(self) -> bool:
        parts = self.key.split(".")
        pattern = f"models.*.{parts[-1]}" if parts[0] == "models" and len(parts) == 3 else self.key
        return pattern in LIVE


def _section(prefix: str, old: Any, new: Any) -> list[Change]:
    return [
        Change(f"{prefix}.{f.name}", getattr(old, f.name), getattr(new, f.name))
        for f in fields(old)
        if getattr(old, f.name) != getattr(new, f.name)
    ]


def diff(old: Config, new: Config) -> list[Change]:
    changes = _section("server", old.server, new.server)
    changes += _section("log", old.log, new.log)
    changes += _section("metrics", old.metrics, new.metrics)
    changes += _section("http", old.http, new.http)
    changes += _section("update", old.update, new.update)
    if old.default_model != new.default_model:
        changes.append(Change("default_model", old.default_model, new.default_model))
    old_models = {m.name: m for m in old.models}
    new_models = {m.name: m for m in new.models}
    for name in sorted(old_models.keys() | new_models.keys()):
        a, b = old_models.get(name), new_models.get(name)
        if a is None or b is None:
            changes.append(Change(f"models.{name}", a and a.path, b and b.path))
        else:
            changes += [c for c in _section(f"models.{name}", a, b) if not c.key.endswith(".name")]
    return changes


def merge_live(old: Config, new: Config, changes: list[Change]) -> Config:
    """The config the daemon runs with after the reload: old, plus the live changes."""
    live = {c.key for c in changes if c.live}
    server = replace(
        old.server,
        **{
            k.split(".")[1]: getattr(new.server, k.split(".")[1])
            for k in live
            if k.startswith("server.")
        },
    )
    log = replace(
        old.log,
        **{
            k.split(".")[1]: getattr(new.log, k.split(".")[1]) for k in live if k.startswith("log.")
        },
    )
    update = replace(
        old.update,
        **{
            k.split(".")[1]: getattr(new.update, k.split(".")[1])
            for k in live
            if k.startswith("update.")
        },
    )
    new_models = {m.name: m for m in new.models}
    models = tuple(
        replace(
            m,
            **{
                k.split(".")[2]: getattr(new_models[m.name], k.split(".")[2])
                for k in live
                if k.startswith(f"models.{m.name}.")
            },
        )
        for m in old.models
    )
    return replace(old, server=server, log=log, models=models, update=update)


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
