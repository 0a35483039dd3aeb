"""The schema is the one declaration of every key: the loader, env names, `config --keys`
and docs/configuration.md are all derived from it, and cannot drift from it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sidecar.cli.commands import main
from sidecar.config import Config, Overrides, load, schema
from sidecar.config.fields import choices, toml_type
from sidecar.config.reference import markdown, shown_default
from sidecar.domain.detectors import DETECTORS
from sidecar.domain.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
KEYS = list(schema.each_key())
REGENERATE = ".venv/bin/python scripts/gen_config_docs.py"
KEYS_OUTPUT = CliRunner().invoke(main, ["config", "--keys"]).output.splitlines()


def test_configuration_reference_matches_the_schema() -> None:
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == markdown(), f"docs/configuration.md is stale: run {REGENERATE}"


@pytest.mark.parametrize("spec", KEYS, ids=[k.name for k in KEYS])
def test_every_key_is_documented_valid_by_default_and_listed(spec: schema.KeySpec) -> None:
    assert spec.doc.strip() and "\n" not in spec.doc, "one-line doc"
    if not spec.required:
        assert spec.check(spec.default) is None, "the default passes the key's own check"
    if spec.section != "tasks":  # task tables are set in the file only, as they always were
        assert spec.env == f"SIDECAR_{spec.name.replace('models.NAME', 'model')}".upper().replace(
            ".", "_"
        )
    assert f"| `{spec.name}` |" in markdown()
    listed = [line for line in KEYS_OUTPUT if line.startswith(f"{spec.name} (")]
    assert listed == [
        f"{spec.name} ({spec.type_name}, default {shown_default(spec)!r}): {spec.doc}"
    ]


def test_config_keys_prints_choices_and_lists_as_toml_writes_them() -> None:
    out = CliRunner().invoke(main, ["config", "--keys"]).output.splitlines()
    assert (
        "log.format (text|json, default 'text'): Log line format: text or json (JSON lines)." in out
    )
    sensitive = next(line for line in out if line.startswith("cloud.sensitive "))
    assert sensitive.startswith(f"cloud.sensitive (list, default {list(DETECTORS)!r}): ")
    assert len(out) == len(KEYS)


# ---------------------------------------------------------------- env names come from the schema

# Valid values for keys whose check a generic value would fail.
SAMPLES = {
    "store.key": "ab" * 32,
    "server.tcp_host": "localhost",
    "metrics.host": "::1",
    "http.host": "localhost",
    "cloud.base_url": "http://127.0.0.1:9/v1",
    "cloud.api_key_env": "CLOUD_KEY",
    "cloud.sensitive": "email,card",
    "cloud.pre_route_tasks": "chat, extract",
    "cloud.classify_threshold": "0.5",
    "cloud.classify_margin": "0.25",
    "cloud.classify_none_novelty": "0.5",
    "tasks.NAME.threshold": "0.5",
    "models.NAME.eval": "bank",  # the task the test's config file declares
    "models.NAME.eval_max_regression": "0.5",
    "server.tcp_token": "secret",
    "http.token": "secret",
}
# Keys another key requires, set so that any one key can be changed alone.
COMPANIONS = {
    "SIDECAR_SERVER_TCP_TOKEN": "t",
    "SIDECAR_HTTP_TOKEN": "t",
    "SIDECAR_CLOUD_MODEL": "m",
    "SIDECAR_MODEL_PATH": "/m.gguf",
}


def sample(spec: schema.KeySpec) -> str:
    """A valid value, different from the default, as the environment would give it."""
    if spec.name in SAMPLES:
        return SAMPLES[spec.name]
    if options := choices(schema.base_type(spec)):
        return next(o for o in options if o != spec.default)
    kind = toml_type(spec.type)
    if kind is bool:
        return "off" if spec.default else "on"
    if kind in (int, float):
        return str(spec.default + 1)
    if kind is list:
        return "a, b"
    return "/from/env"


def value(config: Config, spec: schema.KeySpec) -> Any:
    if spec.section == "models":
        return getattr(config.models[0], spec.field)
    return getattr(getattr(config, spec.section) if spec.section else config, spec.field)


ENV_KEYS = [k for k in KEYS if k.env]


@pytest.mark.parametrize("spec", ENV_KEYS, ids=[k.name for k in ENV_KEYS])
def test_each_keys_environment_variable_sets_it(tmp_path: Path, spec: schema.KeySpec) -> None:
    empty = tmp_path / "c.toml"
    empty.write_text("")
    if spec.name == "models.NAME.eval":  # the gate's task must exist, with a golden set
        empty.write_text('[tasks.bank]\nfile = "/t.csv"\neval_file = "/g.csv"\n')
    before = load(Overrides(config=empty), env=COMPANIONS)
    env = {**COMPANIONS, spec.env: sample(spec)}
    if spec.name == "default_model":  # a name needs its table; the first is the default
        empty.write_text('[models.a]\npath = "/a.gguf"\n[models.b]\npath = "/b.gguf"\n')
        env[spec.env] = "b"
        before = load(Overrides(config=empty), env=COMPANIONS)
    after = load(Overrides(config=empty), env=env)
    assert value(after, spec) != value(before, spec)


def test_a_bad_environment_value_is_named_by_its_toml_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load(Overrides(config=tmp_path / "none.toml"), env={"SIDECAR_STORE_SWAP_STRATEGY": "x"})
    assert e.value.key == str(tmp_path / "none.toml")  # the file is read first
    (tmp_path / "c.toml").write_text("")
    with pytest.raises(ConfigError) as e:
        load(Overrides(config=tmp_path / "c.toml"), env={"SIDECAR_STORE_SWAP_STRATEGY": "x"})
    assert e.value.key == "store.swap_strategy"
    assert "side_by_side, replace" in e.value.problem


def test_unknown_tables_are_errors_listing_every_table(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[cloudd]\nx = 1\n")
    with pytest.raises(ConfigError) as e:
        load(Overrides(config=path), env={})
    assert e.value.key == "cloudd"
    assert e.value.problem == (
        "unknown key (known: default_model, [server], [log], [metrics], [store], [http], "
        "[update], [cloud], [models.NAME], [tasks.NAME])"
    )


def test_key_finds_a_concrete_table_entrys_key() -> None:
    assert schema.key("models.my.model.max_queue") is schema.key("models.NAME.max_queue")
    assert schema.key("cloud.daily_cap").live and not schema.key("cloud.base_url").live
    with pytest.raises(KeyError):
        schema.key("server.nope")


def test_lists_load_as_tuples_and_paths_as_paths(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[cloud]\npre_route_keywords = ["a"]\n[store]\ndrop = "~/drop"\n')
    cfg = load(Overrides(config=path), env={})
    assert cfg.cloud.pre_route_keywords == ("a",)
    assert cfg.store.drop == Path("~/drop").expanduser()
    assert load(Overrides(config=path), env={"SIDECAR_STORE_DROP": ""}).store.drop is None


# ---------------------------------------------------------------- layering


def test_config_and_reload_import_only_the_domain() -> None:
    # The config sits just above the domain: loading it must not pull in the parts it
    # configures (the privacy scanner used to come along for its detector names).
    code = (
        "import json, sys, sidecar.config, sidecar.reload\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('sidecar.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    allowed = ("sidecar.config", "sidecar.domain", "sidecar.reload")
    assert [m for m in json.loads(out.stdout) if not m.startswith(allowed)] == []


def test_the_scanner_knows_exactly_the_detectors_the_config_accepts() -> None:
    from sidecar.router import privacy

    assert tuple(privacy.BUILTIN) == DETECTORS
    assert schema.key("cloud.sensitive").default == DETECTORS
