"""Building a Config from the schema: defaults < TOML < environment < CLI flags.

Every key is read the same way: its TOML value, then its environment variable (the schema
names it), then a flag, coerced to the field's type and checked by the field. What one
field cannot check alone (a token required with a port, a task's model) is checked per
section below. Errors name the TOML key.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.config.fields import toml_type
from sidecar.config.schema import (
    KEYS,
    SECTIONS,
    Config,
    KeySpec,
    ModelConfig,
    TaskConfig,
    base_type,
)
from sidecar.domain.detectors import compile_pattern
from sidecar.domain.errors import ConfigError
from sidecar.domain.names import name_problem, shown

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the machines run 3.11
    import tomli as tomllib

DEFAULT_MODEL_NAME = "default"


@dataclass(frozen=True)
class Overrides:
    """CLI flags, already parsed; None = not given."""

    config: Path | None = None
    socket: Path | None = None
    model: str | None = None  # a configured name, or a GGUF path
    workers: int | None = None
    threads: int | None = None
    context: int | None = None
    log_format: str | None = None
    log_level: str | None = None
    tcp_port: int | None = None
    store: Path | None = None
    http_port: int | None = None
    http_socket: Path | None = None


# Which key each flag sets: (section, field). The default model's flags are in MODEL_FLAGS.
FLAGS = {
    "socket": ("server", "socket"),
    "tcp_port": ("server", "tcp_port"),
    "log_format": ("log", "format"),
    "log_level": ("log", "level"),
    "http_port": ("http", "port"),
    "http_socket": ("http", "socket"),
    "store": ("store", "path"),
}
MODEL_FLAGS = ("workers", "threads", "context")

_BOOLS = {"1": True, "true": True, "yes": True, "on": True}
_BOOLS |= {"0": False, "false": False, "no": False, "off": False}


def _coerce(key: str, spec: KeySpec, value: Any) -> Any:
    """The value as the field's TOML type, checked; strings (env, flags) are parsed."""
    want = toml_type(spec.type)
    if want is list and isinstance(value, str):  # from the environment: comma-separated
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, str) and want is not str:
        text = value.strip()
        try:
            value = _BOOLS[text.lower()] if want is bool else want(text)
        except (KeyError, ValueError):
            raise ConfigError(key, f"expected {want.__name__}, got {value!r}") from None
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(key, f"expected {want.__name__}, got {type(value).__name__} {value!r}")
    if isinstance(value, list):
        if not all(isinstance(x, str) for x in value):
            raise ConfigError(key, "must be a list of strings")
        value = tuple(value)
    if problem := spec.check(value):
        raise ConfigError(key, problem)
    return value


@dataclass(frozen=True)
class _Where:
    """What resolving paths needs: the environment and the file the settings came from."""

    env: Mapping[str, str]
    source: Path | None


def _table(
    prefix: str, keys: Sequence[KeySpec], raw: Mapping[str, Any], where: _Where
) -> dict[str, Any]:
    """One table's fields: defaults, overlaid by `raw`, checked, paths resolved."""
    known = {k.field: k for k in keys}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown key (known: {', '.join(known)})")
    out = {k.field: k.default for k in keys}
    for name, value in raw.items():
        out[name] = _coerce(f"{prefix}{name}", known[name], value)
    for k in keys:
        if k.required and not out[k.field]:
            raise ConfigError(f"{prefix}{k.field}", f"required: {k.setting.required}")
        if base_type(k) is Path:
            out[k.field] = _path(k, out[k.field], where)
    return out


def _path(spec: KeySpec, value: str, where: _Where) -> Path | None:
    if not value:
        if spec.setting.fallback is not None:
            return spec.setting.fallback(where.env)
        return None
    path = Path(value).expanduser()
    if spec.setting.relative and not path.is_absolute() and where.source is not None:
        path = where.source.parent / path  # relative to the config file, like include paths
    return path


def _server(v: dict[str, Any]) -> None:
    if v["tcp_port"] and not v["tcp_token"]:
        raise ConfigError(
            "server.tcp_token", "required when server.tcp_port is set (TCP needs a bearer token)"
        )


def _http(v: dict[str, Any]) -> None:
    if v["port"] and not v["token"]:
        raise ConfigError("http.token", "required when http.port is set (TCP needs a bearer token)")
    v["socket"] = str(Path(v["socket"]).expanduser()) if v["socket"] else ""


def _cloud(v: dict[str, Any]) -> None:
    if v["base_url"] and not v["model"]:
        raise ConfigError("cloud.model", "required when cloud.base_url is set")
    for rx in v["sensitive_patterns"]:
        try:
            compile_pattern(rx)
        except ValueError as e:  # named as the detectors' key, as it always was
            raise ConfigError("cloud.sensitive", str(e)) from None


# The plain [section] tables, in the schema's order.
_CLASSES: dict[str, type] = {s.name: s.cls for s in SECTIONS if s.name and not s.named}


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), "config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"not valid TOML: {e}") from None
    except OSError as e:  # e.g. a system config this user may not read
        raise ConfigError(str(path), f"cannot read the config file: {e.strerror or e}") from None


def read_source(
    o: Overrides, env: Mapping[str, str], defaults: Sequence[Path]
) -> tuple[dict[str, Any], Path | None]:
    """The TOML table and the file it came from: --config, else SIDECAR_CONFIG, else the
    first of `defaults` that exists (None when none does, or when that one is empty)."""
    path = o.config or (Path(env["SIDECAR_CONFIG"]) if env.get("SIDECAR_CONFIG") else None)
    if path is not None:
        return read_toml(path), path
    found = next((p for p in defaults if p.exists()), None)
    raw = read_toml(found) if found is not None else {}
    return raw, found if raw else None


def _from_env(keys: Sequence[KeySpec], env: Mapping[str, str]) -> dict[str, Any]:
    return {k.field: env[k.env] for k in keys if k.env and k.env in env}


def _flags(o: Overrides, section: str) -> dict[str, Any]:
    given = {f: getattr(o, flag) for flag, (s, f) in FLAGS.items() if s == section}
    return {f: str(v) if isinstance(v, Path) else v for f, v in given.items() if v is not None}


def _check_layout(raw: Mapping[str, Any]) -> None:
    tables = [s for s in SECTIONS if s.name]
    top = [k.field for k in KEYS[""]]
    unknown = sorted(set(raw) - {*top, *(s.name for s in tables)})
    if unknown:
        known = [*top, *(f"[{s.name}.NAME]" if s.named else f"[{s.name}]" for s in tables)]
        raise ConfigError(unknown[0], f"unknown key (known: {', '.join(known)})")
    for s in tables:
        if not isinstance(raw.get(s.name, {}), dict):
            raise ConfigError(s.name, "must be a table")


def load(o: Overrides, env: Mapping[str, str], defaults: Sequence[Path]) -> Config:
    """Build the Config. Raises ConfigError naming the offending key."""
    raw, source = read_source(o, env, defaults)
    where = _Where(env, source)
    _check_layout(raw)

    top_raw = {k.field: raw[k.field] for k in KEYS[""] if k.field in raw} | _from_env(KEYS[""], env)
    top = _table("", KEYS[""], top_raw, where)
    fields = {  # each key checked on its own, table by table: TOML < env < flags
        name: _table(
            f"{name}.",
            KEYS[name],
            {**raw.get(name, {}), **_from_env(KEYS[name], env), **_flags(o, name)},
            where,
        )
        for name in _CLASSES
    }
    # Then what one key cannot check alone, in the order the loader always reported it.
    _http(fields["http"])
    default_name, models = _models(raw.get("models", {}), top["default_model"], o, env, where)
    _server(fields["server"])
    _cloud(fields["cloud"])
    tasks = _tasks(raw.get("tasks", {}), {m.name for m in models}, where)
    _gates(models, tasks)
    return Config(
        default_model=default_name,
        models=models,
        tasks=tasks,
        source=source,
        **{name: cls(**fields[name]) for name, cls in _CLASSES.items()},
    )


def _models(
    raw: Mapping[str, Any], default: str, o: Overrides, env: Mapping[str, str], where: _Where
) -> tuple[str, tuple[ModelConfig, ...]]:
    """The default model's name and every [models.NAME] table; --model, SIDECAR_MODEL_* and
    the model flags apply to the default model (created when there is none)."""
    tables: dict[str, dict[str, Any]] = {}
    for name, table in raw.items():
        if problem := name_problem(name):  # the name is a directory in the model store
            raise ConfigError(f"models.{shown(name)}", problem)
        if not isinstance(table, dict):
            raise ConfigError(f"models.{name}", "must be a table")
        tables[name] = dict(table)

    if default and (problem := name_problem(default)):
        raise ConfigError("default_model", problem)
    default = default or next(iter(tables), "")
    if o.model is not None:
        if o.model in tables:
            default = o.model
        else:  # a path: it becomes (or replaces the file of) the default model
            default = default or DEFAULT_MODEL_NAME
            tables.setdefault(default, {})["path"] = o.model
    given = _from_env(KEYS["models"], env)
    given |= {k: v for k in MODEL_FLAGS if (v := getattr(o, k)) is not None}
    if given:
        default = default or DEFAULT_MODEL_NAME
        tables.setdefault(default, {}).update(given)
    if default and default not in tables:
        raise ConfigError(
            "default_model",
            f"no [models.{default}] table (known: {', '.join(tables) or 'none'})",
        )
    models = tuple(
        ModelConfig(name=name, **_table(f"models.{name}.", KEYS["models"], table, where))
        for name, table in tables.items()
    )
    return default, models


def _tasks(raw: Mapping[str, Any], models: set[str], where: _Where) -> tuple[TaskConfig, ...]:
    out = []
    for name, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"tasks.{name}", "must be a table")
        fields = _table(f"tasks.{name}.", KEYS["tasks"], table, where)
        if fields["model"] and fields["model"] not in models:
            raise ConfigError(f"tasks.{name}.model", f"no [models.{fields['model']}] table")
        out.append(TaskConfig(name=name, **fields))
    return tuple(out)


def _gates(models: tuple[ModelConfig, ...], tasks: tuple[TaskConfig, ...]) -> None:
    """A model's eval gate names a task that has a golden set (its eval_file)."""
    by_name = {t.name: t for t in tasks}
    for m in models:
        if not m.eval:
            continue
        task = by_name.get(m.eval)
        if task is None:
            known = ", ".join(by_name) or "none"
            raise ConfigError(
                f"models.{m.name}.eval", f"no [tasks.{m.eval}] table (known: {known})"
            )
        if not task.eval_file:
            raise ConfigError(
                f"models.{m.name}.eval",
                f"task {m.eval!r} has no golden set: set tasks.{m.eval}.eval_file "
                "(a CSV of texts and their right labels)",
            )


@dataclass(frozen=True)
class ClientConfig:
    """The client's view: where the daemon listens and the token its TCP listener wants."""

    socket: Path
    tcp_token: str
    source: Path | None  # the TOML file read, if any


CLIENT_KEYS = ("socket", "tcp_token")  # of [server]: all a client reads


def load_client(o: Overrides, env: Mapping[str, str], defaults: Sequence[Path]) -> ClientConfig:
    """Build the client's view (only `o.config` and `o.socket` count). The keys it reads
    are checked as `load()` checks them, and an unknown [server] key is still an error (a
    misspelt `socket` would send the client elsewhere); the rest of the file is the
    daemon's business."""
    raw, source = read_source(o, env, defaults)
    table = raw.get("server", {})
    if not isinstance(table, dict):
        raise ConfigError("server", "must be a table")
    server = KEYS["server"]
    unknown = sorted(set(table) - {k.field for k in server})
    if unknown:
        known = ", ".join(k.field for k in server)
        raise ConfigError(f"server.{unknown[0]}", f"unknown key (known: {known})")
    given = {**table, **_from_env(server, env), **_flags(o, "server")}
    keys = [k for k in server if k.field in CLIENT_KEYS]
    fields = _table(
        "server.", keys, {k: v for k, v in given.items() if k in CLIENT_KEYS}, _Where(env, source)
    )
    return ClientConfig(fields["socket"], fields["tcp_token"], source)
