"""SIGHUP: re-read the configuration, apply what can change live, report the rest.

`diff` is pure (table-tested) and walks the schema (`sidecar.config.schema.each_key()`), so a
key added to the schema is diffed without being listed here. Whether a change is applied
live comes from the key's own declaration (`setting(..., live=True)`); any other change is
named as needing a restart, in the log and in `sidecar status`. A `[models.NAME]` or
`[tasks.NAME]` table added or removed needs a restart. Nothing is silently dropped; an
invalid new file changes nothing. `merge_live` gives the config the daemon runs with
afterwards; the daemon hands it to the running parts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sidecar.config import Config
from sidecar.config.schema import KEYS, SECTIONS, KeySpec


@dataclass(frozen=True)
class Change:
    key: str  # as in the TOML: "server.max_labels", "models.NAME.workers", "tasks.NAME"
    old: Any
    new: Any
    live: bool = False  # applied without a restart (from the key's declaration)


def _changes(prefix: str, keys: tuple[KeySpec, ...], old: Any, new: Any) -> list[Change]:
    return [
        Change(prefix + k.field, a, b, k.live)
        for k in keys
        if (a := getattr(old, k.field)) != (b := getattr(new, k.field))
    ]


def diff(old: Config, new: Config) -> list[Change]:
    changes: list[Change] = []
    for section in SECTIONS:
        keys = KEYS[section.name]
        if not section.name:
            changes += _changes("", keys, old, new)
        elif not section.named:
            a, b = getattr(old, section.name), getattr(new, section.name)
            changes += _changes(f"{section.name}.", keys, a, b)
        else:
            olds = {e.name: e for e in getattr(old, section.name)}
            news = {e.name: e for e in getattr(new, section.name)}
            for name in sorted(olds.keys() | news.keys()):
                x, y = olds.get(name), news.get(name)
                if x is None or y is None:  # a table added or removed: a restart builds it
                    changes.append(Change(f"{section.name}.{name}", x, y))
                else:
                    changes += _changes(f"{section.name}.{name}.", keys, x, y)
    return changes


def _take(old: Any, new: Any, prefix: str, keys: tuple[KeySpec, ...], live: set[str]) -> Any:
    picked = {k.field: getattr(new, k.field) for k in keys if prefix + k.field in live}
    return replace(old, **picked) if picked else old


def merge_live(old: Config, new: Config, changes: list[Change]) -> Config:
    """The config the daemon runs with after the reload: old, plus the live changes."""
    live = {c.key for c in changes if c.live}
    merged: Config = _take(old, new, "", KEYS[""], live)
    for section in SECTIONS:
        if not section.name:
            continue
        keys, a, b = KEYS[section.name], getattr(old, section.name), getattr(new, section.name)
        if section.named:
            news = {e.name: e for e in b}
            prefix = f"{section.name}."
            value: Any = tuple(
                _take(e, news[e.name], f"{prefix}{e.name}.", keys, live) if e.name in news else e
                for e in a
            )
        else:
            value = _take(a, b, f"{section.name}.", keys, live)
        merged = replace(merged, **{section.name: value})
    return merged


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
