"""How one setting is declared: a dataclass field whose metadata carries the rest.

`setting(default, doc, ...)` is the field; its annotation is the type. Everything else about
a key (its TOML name, env variable, live flag, how a value is checked) is read from here by
the loader, `reload.diff`, `sidecar config --keys` and the generated reference.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

Check = Callable[[Any], "str | None"]  # a problem with the value, or None
Fallback = Callable[[Mapping[str, str]], Path]  # a path derived when the key is left empty

SETTING = "sidecar.setting"  # the metadata key holding a Setting
TABLE = "sidecar.table"  # the metadata key holding a Table (a [section.NAME] list)


@dataclass(frozen=True)
class Setting:
    """What a field's annotation and default do not say."""

    doc: str
    default: Any  # as written in TOML ("" for a path derived at load)
    check: Check | None = None
    minimum: float | None = None
    live: bool = False  # a SIGHUP applies a new value without a restart
    env: bool = True  # settable from the environment
    required: str = ""  # non-empty: the key must be set; the text says what it is
    fallback: Fallback | None = None  # a Path key left "" becomes this
    relative: bool = False  # a relative path is read from the config file's directory


@dataclass(frozen=True)
class Table:
    """A `[section.NAME]` table list on Config (models, tasks)."""

    doc: str
    env: str = ""  # the env prefix of the default entry's keys ("MODEL"); "" = none


def setting(
    default: Any,
    doc: str,
    *,
    check: Check | None = None,
    minimum: float | None = None,
    live: bool = False,
    env: bool = True,
    fallback: Fallback | None = None,
    relative: bool = False,
) -> Any:
    """A documented key. `default` is the TOML default; a Path key's "" means unset."""
    meta = {SETTING: Setting(doc, default, check, minimum, live, env, "", fallback, relative)}
    if fallback is not None:
        # Built directly (not loaded), the key takes the path derived from this process's env.
        return dataclasses.field(default_factory=lambda: fallback(os.environ), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def required(doc: str, what: str, *, relative: bool = False) -> Any:
    """A key with no default: loading fails naming it, saying `what` it must hold."""
    meta = {SETTING: Setting(doc, "", required=what, relative=relative)}
    return dataclasses.field(metadata=meta)


def table(doc: str, *, env: str = "") -> Any:
    return dataclasses.field(default=(), metadata={TABLE: Table(doc, env)})


# ------------------------------------------------------------------ reading a type


def optional(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None was allowed)."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(get_args(tp))
    return tp, False


def choices(tp: Any) -> tuple[str, ...]:
    """A Literal's values, () for any other type."""
    return tuple(get_args(tp)) if get_origin(tp) is Literal else ()


def toml_type(tp: Any) -> type:
    """What a value of this key is written as in TOML (str, int, float, bool or list)."""
    tp, _ = optional(tp)
    if choices(tp) or tp is Path:
        return str
    if get_origin(tp) is tuple:
        return list
    if not isinstance(tp, type):
        raise TypeError(f"unsupported setting type {tp!r}")
    return tp


def type_name(tp: Any) -> str:
    """As `config --keys` and the reference show it: `int`, `list`, `text|json`."""
    return "|".join(choices(tp)) or toml_type(tp).__name__


def problem(spec: Setting, tp: Any, value: Any) -> str | None:
    """What is wrong with an already typed value, or None: choices, bounds, then the check."""
    allowed = choices(tp)
    if allowed and value not in allowed:
        return f"must be one of {', '.join(allowed)}, got {value!r}"
    if spec.minimum is not None and value < spec.minimum:
        return f"must be >= {spec.minimum:g}, got {value}"
    return spec.check(value) if spec.check else None
