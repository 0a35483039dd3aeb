"""Where configuration and its derived paths live on this machine."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import platformdirs

APP = "sidecar"

# The system service's config (the Debian package ships it; `sidecar service install` points
# the system unit at it). Not platformdirs' site dir (/etc/xdg/sidecar): /etc/sidecar is
# where a system daemon's config lives on Linux.
SYSTEM_CONFIG = Path("/etc/sidecar/config.toml")


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


def default_store_path() -> Path:
    return Path(platformdirs.user_data_dir(APP)) / "store"


def default_socket_path(env: Mapping[str, str] | None = None) -> Path:
    """<runtime dir>/sidecar/sidecar.sock, the per-user runtime directory when there is one."""
    env = os.environ if env is None else env
    if sys.platform == "darwin":
        return Path(platformdirs.user_runtime_dir(APP)) / "sidecar.sock"
    candidates = [env.get("XDG_RUNTIME_DIR", ""), f"/run/user/{os.getuid()}"]
    # /run/user/<uid> exists only in a login session; a service or container may lack it.
    base = next((Path(c) for c in candidates if c and os.access(c, os.W_OK)), None)
    runtime = base / APP if base else Path(tempfile.gettempdir()) / f"{APP}-{os.getuid()}"
    return runtime / "sidecar.sock"
