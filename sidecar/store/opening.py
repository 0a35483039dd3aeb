"""The store a daemon or a CLI command opens: its folder and, when configured, its keys."""

from __future__ import annotations

from collections.abc import Mapping

from sidecar.config import StoreConfig
from sidecar.store.keys import load_keyring
from sidecar.store.model_store import ModelStore


def open_store(cfg: StoreConfig, env: Mapping[str, str]) -> ModelStore:
    """The store of `cfg`, with its keys ($CREDENTIALS_DIRECTORY comes from `env`)."""
    keys = load_keyring(cfg.encryption, cfg.key_file, cfg.previous_key_file, cfg.key, env)
    return ModelStore(cfg.path, keys, encrypt=cfg.encryption)
