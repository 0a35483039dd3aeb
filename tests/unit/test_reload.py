from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import Config, Overrides, load
from sidecar.reload import diff, merge_live, summary


def config(tmp_path: Path, text: str) -> Config:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return load(Overrides(config=p), env={})


BASE = """
[server]
socket = "/s.sock"
max_labels = 10
[log]
level = "info"
[models.a]
path = "/a.gguf"
max_queue = 5
workers = 2
"""


@pytest.mark.parametrize(
    ("edit", "key", "live"),
    [
        (("max_labels = 10", "max_labels = 20"), "server.max_labels", True),
        (('level = "info"', 'level = "debug"'), "log.level", True),
        (("max_queue = 5", "max_queue = 9"), "models.a.max_queue", True),
        (('socket = "/s.sock"', 'socket = "/t.sock"'), "server.socket", False),
        (("workers = 2", "workers = 3"), "models.a.workers", False),
        (('path = "/a.gguf"', 'path = "/b.gguf"'), "models.a.path", False),
    ],
)
def test_each_change_is_classified_live_or_restart(
    tmp_path: Path, edit: tuple[str, str], key: str, live: bool
) -> None:
    old = config(tmp_path, BASE)
    new = config(tmp_path, BASE.replace(*edit))
    (change,) = diff(old, new)
    assert change.key == key
    assert change.live is live


def test_merge_applies_live_changes_and_keeps_the_rest(tmp_path: Path) -> None:
    old = config(tmp_path, BASE)
    new = config(
        tmp_path,
        BASE.replace("max_queue = 5", "max_queue = 9").replace("workers = 2", "workers = 3"),
    )
    changes = diff(old, new)
    merged = merge_live(old, new, changes)
    assert merged.models[0].max_queue == 9
    assert merged.models[0].workers == 2  # needs a restart: not applied
    text = summary(changes)
    assert "applied: models.a.max_queue" in text
    assert "need a restart (not applied): models.a.workers" in text


def test_added_model_needs_a_restart(tmp_path: Path) -> None:
    old = config(tmp_path, BASE)
    new = config(tmp_path, BASE + '[models.b]\npath = "/b.gguf"\n')
    (change,) = diff(old, new)
    assert change.key == "models.b" and not change.live


def test_no_changes(tmp_path: Path) -> None:
    c = config(tmp_path, BASE)
    assert diff(c, c) == []
    assert summary([]) == "no changes"
