from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from sidecar.config import Config, Overrides, load, schema
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


# ---------------------------------------------------------------- every section, from the schema

FULL = (
    BASE
    + """
[store]
drain_seconds = 30.0
path = "/store"
[cloud]
classify_threshold = 0.7
redact = false
retries = 2
[tasks.t]
file = "/t.csv"
threshold = 0.5
"""
)


@pytest.mark.parametrize(
    ("edit", "key", "live"),
    [
        (("drain_seconds = 30.0", "drain_seconds = 5.0"), "store.drain_seconds", True),
        (('path = "/store"', 'path = "/other"'), "store.path", False),
        (
            ("classify_threshold = 0.7", "classify_threshold = 0.9"),
            "cloud.classify_threshold",
            True,
        ),
        (("redact = false", "redact = true"), "cloud.redact", True),
        (("retries = 2", "retries = 4"), "cloud.retries", False),
        (("threshold = 0.5", "threshold = 0.8"), "tasks.t.threshold", True),
        (('file = "/t.csv"', 'file = "/u.csv"'), "tasks.t.file", False),
    ],
)
def test_cloud_store_and_tasks_changes_are_reported(
    tmp_path: Path, edit: tuple[str, str], key: str, live: bool
) -> None:
    old = config(tmp_path, FULL)
    new = config(tmp_path, FULL.replace(*edit))
    (change,) = diff(old, new)
    assert (change.key, change.live) == (key, live)
    merged = merge_live(old, new, [change])
    section, *rest = key.split(".")
    expected = new if live else old
    if section == "tasks":
        assert getattr(merged.tasks[0], rest[-1]) == getattr(expected.tasks[0], rest[-1])
    else:
        assert getattr(getattr(merged, section), rest[-1]) == getattr(
            getattr(expected, section), rest[-1]
        )
    assert ("applied: " if live else "need a restart (not applied): ") + key in summary([change])


def test_added_or_removed_task_needs_a_restart(tmp_path: Path) -> None:
    old = config(tmp_path, FULL)
    new = config(tmp_path, FULL + '[tasks.u]\nfile = "/u.csv"\n')
    (change,) = diff(old, new)
    assert change.key == "tasks.u" and not change.live
    (change,) = diff(new, old)
    assert change.key == "tasks.u" and not change.live


def _other(value: object) -> object:
    """A different value of the same kind, for any config field."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple):
        return (*value, "x")
    return Path("/elsewhere")  # a Path, or None (an optional path that is off)


def _with(cfg: Config, key: str) -> Config:
    """cfg with the documented key `key` (models.NAME.x / tasks.NAME.x on the first entry) changed."""
    parts = key.split(".")
    if len(parts) == 1:
        return replace(cfg, **{key: _other(getattr(cfg, key))})
    if parts[1] == "NAME":
        entries = getattr(cfg, parts[0])
        first = replace(entries[0], **{parts[2]: _other(getattr(entries[0], parts[2]))})
        return replace(cfg, **{parts[0]: (first, *entries[1:])})
    section = getattr(cfg, parts[0])
    return replace(
        cfg, **{parts[0]: replace(section, **{parts[1]: _other(getattr(section, parts[1]))})}
    )


def test_every_documented_key_is_diffed_and_applied_or_named(tmp_path: Path) -> None:
    # The schema against diff: a key or section added to the config can never be missed by SIGHUP.
    old = config(tmp_path, FULL)
    for key in (k.name for k in schema.each_key()):
        new = _with(old, key)
        changes = diff(old, new)
        shown = key.replace("NAME", old.models[0].name if key.startswith("models") else "t")
        assert [c.key for c in changes] == [shown], key
        assert changes[0].live is schema.key(key).live, key  # as the key declares it
        merged = merge_live(old, new, changes)
        assert merged == (new if changes[0].live else old), key
        assert shown in summary(changes)


def test_live_keys_are_todays_plus_the_cloud_caps_prices_and_privacy_gate() -> None:
    # Live is declared per key (setting(..., live=True)); this pins the set, so making a key
    # live (the daemon must then apply it) or no longer live is a visible decision.
    live = {k.name for k in schema.each_key() if k.live}
    assert live == LIVE


LIVE = {
    "log.format",
    "log.level",
    "server.max_labels",
    "server.max_embed_texts",
    "server.grace_seconds",
    "server.ping_interval_seconds",
    "server.hang_seconds",
    "server.probe_interval_seconds",
    "server.min_available_mb",
    "server.max_model_memory_mb",
    "models.NAME.max_queue",
    "models.NAME.max_rss_mb",
    "models.NAME.keep_alive",
    "models.NAME.update_origin",
    "models.NAME.update_key",
    # The eval gate and probation read the pool's config per swap and per pass.
    "models.NAME.eval",
    "models.NAME.eval_min_accuracy",
    "models.NAME.eval_max_regression",
    "models.NAME.probation_latency_factor",
    "update.interval_seconds",
    "update.healthy_seconds",
    "update.timeout_seconds",
    "update.retries",
    "update.fetch_deadline_seconds",
    "update.fetch_min_bytes_per_second",
    "update.identity",  # the rollout hash reads it per check (a new cohort, no restart)
    # Read by `sidecar pull` (a client) per pull; the daemon only holds them.
    "update.catalog_origin",
    "update.catalog_key",
    "store.auto_swap",
    "store.drop_remove_plaintext",
    "store.swap_strategy",
    "store.drain_seconds",
    "store.swap_wait_seconds",
    "cloud.routing",
    "cloud.local_timeout_seconds",
    "cloud.classify_threshold",
    "cloud.classify_margin",
    "cloud.classify_none_novelty",
    "cloud.extract_mean_logprob",
    "cloud.generate_mean_logprob",
    "cloud.generate_min_logprob",
    "cloud.pre_route_max_chars",
    "cloud.pre_route_keywords",
    "cloud.pre_route_tasks",
    "cloud.shadow_rate",
    "cloud.shadow_daily_cap",
    "cloud.daily_cap",
    "cloud.monthly_cap",
    "cloud.prompt_price_per_mtok",
    "cloud.completion_price_per_mtok",
    "cloud.sensitive",
    "cloud.sensitive_patterns",
    "cloud.redact",
    "tasks.NAME.threshold",
    "tasks.NAME.target_accuracy",
    "tasks.NAME.scope_alpha",
    "tasks.NAME.eval_file",  # read by `sidecar eval` (a client)
}


def test_model_names_with_dots_keep_their_live_keys(tmp_path: Path) -> None:
    text = BASE.replace("[models.a]", "[models.my.model]")
    text = text.replace("[models.my.model]", '[models."my.model"]')
    old = config(tmp_path, text)
    (change,) = diff(old, config(tmp_path, text.replace("max_queue = 5", "max_queue = 9")))
    assert change.key == "models.my.model.max_queue" and change.live
