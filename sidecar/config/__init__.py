"""The one place configuration is built: defaults < TOML < environment < CLI flags.

Nothing else in sidecar reads the environment or the config file. `load()` returns a
frozen `Config`; an invalid value raises `ConfigError` naming the TOML key.

Each key is declared once, as a field of a frozen dataclass in `schema.py` (type, default,
check, one-line doc, live or restart); everything else is derived from that declaration:

- the loader (`loader.py`), and the environment names: `SIDECAR_<SECTION>_<KEY>` for the
  plain tables (lists comma-separated), `SIDECAR_MODEL_<KEY>` for the default model's
  keys, `SIDECAR_DEFAULT_MODEL`; `SIDECAR_CONFIG` names the file;
- `sidecar config --keys` and docs/configuration.md (`reference.py`;
  `scripts/gen_config_docs.py` writes the file, a test fails when it is stale);
- `sidecar.reload.diff`, which applies a change live or names it as needing a restart.

Public helpers for the rest of sidecar:

- `schema.each_key()` yields a `KeySpec` per key: `.name` as in the TOML ("server.socket",
  "models.NAME.workers", "default_model"), `.section` and `.field` (where it sits on
  `Config`), `.type`, `.type_name`, `.default` (as written in TOML), `.doc`, `.env` (the
  variable, "" when none), `.live`, `.named` (a [section.NAME] table), `.check(value)`.
  `schema.key("cloud.daily_cap")` finds one (a concrete "models.chat.workers" too).
- `load(overrides, env)` and `load_client(overrides, env)`.

Two views, one loader: `load()` is the daemon's whole Config; `load_client()` is what a
client needs to find the daemon (server.socket, server.tcp_token), read from the same file
and environment but without the daemon's cross-checks (a token kept in the service's
environment, a model file only the service can read). With no --config and no
SIDECAR_CONFIG, both read the user config file; a client with none falls back to the system
service's /etc/sidecar/config.toml, so a plain `sidecar status` finds the packaged daemon.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from sidecar.config import loader, schema
from sidecar.config.loader import DEFAULT_MODEL_NAME, ClientConfig, Overrides
from sidecar.config.paths import (
    APP,
    SYSTEM_CONFIG,
    default_config_path,
    default_socket_path,
    default_store_path,
)
from sidecar.config.schema import (
    CloudConfig,
    Config,
    HttpConfig,
    KeySpec,
    LogConfig,
    MetricsConfig,
    ModelConfig,
    ServerConfig,
    StoreConfig,
    TaskConfig,
    UpdateConfig,
)

__all__ = [
    "APP",
    "DEFAULT_MODEL_NAME",
    "SYSTEM_CONFIG",
    "ClientConfig",
    "CloudConfig",
    "Config",
    "HttpConfig",
    "KeySpec",
    "LogConfig",
    "MetricsConfig",
    "ModelConfig",
    "Overrides",
    "ServerConfig",
    "StoreConfig",
    "TaskConfig",
    "UpdateConfig",
    "default_config_path",
    "default_socket_path",
    "default_store_path",
    "load",
    "load_client",
    "schema",
]


def load(overrides: Overrides | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build the daemon's Config. Raises ConfigError naming the offending key."""
    # Only the user's file: a daemon started by hand is the user's own, not the system one.
    return loader.load(
        overrides or Overrides(), os.environ if env is None else env, (default_config_path(),)
    )


def load_client(
    overrides: Overrides | None = None, env: Mapping[str, str] | None = None
) -> ClientConfig:
    """Build the client's view: the user's file, else the system service's."""
    # SYSTEM_CONFIG is read from this module at call time: tests point it elsewhere.
    return loader.load_client(
        overrides or Overrides(),
        os.environ if env is None else env,
        (default_config_path(), SYSTEM_CONFIG),
    )
