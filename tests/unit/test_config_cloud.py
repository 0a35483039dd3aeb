"""[cloud] and [tasks.NAME]: defaults, layering, and each bad value named by its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import Overrides, load
from sidecar.domain.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def test_no_cloud_by_default_and_auto_routing(tmp_path: Path) -> None:
    cfg = load(Overrides(config=write(tmp_path, "")), env={})
    assert not cfg.cloud.enabled and cfg.cloud.routing == "AUTO"
    assert cfg.cloud.sensitive == ("email", "card", "iban", "phone") and cfg.tasks == ()


def test_cloud_and_tasks_from_toml_and_env(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[cloud]
base_url = "http://127.0.0.1:8080/v1"
model = "big"
api_key_env = "OPENAI_API_KEY"
sensitive_patterns = ["ACCT-\\\\d+"]
daily_cap = 5
[models.demo]
path = "/m/a.gguf"
[tasks.intents]
file = "intents.csv"
label_column = "category"
""",
    )
    cfg = load(Overrides(config=path), env={"SIDECAR_CLOUD_ROUTING": "LOCAL_ONLY",
                                            "SIDECAR_CLOUD_PRE_ROUTE_KEYWORDS": "refund, lawsuit"})  # fmt: skip
    c = cfg.cloud
    assert c.enabled and c.model == "big" and c.daily_cap == 5.0 and c.routing == "LOCAL_ONLY"
    assert c.sensitive_patterns == ("ACCT-\\d+",) and c.pre_route_keywords == ("refund", "lawsuit")
    (task,) = cfg.tasks
    assert task.file == tmp_path / "intents.csv"  # relative to the config file
    assert (task.text_column, task.label_column, task.threshold) == ("text", "category", -1.0)


@pytest.mark.parametrize(
    ("toml", "key", "problem"),
    [
        ('[cloud]\nbase_url = "http://x/v1"', "cloud.model", "required"),
        ('[cloud]\nbase_url = "ftp://x"\nmodel = "m"', "cloud.base_url", "http://"),
        (
            '[cloud]\napi_key_env = "sk-abc123-secret"',
            "cloud.api_key_env",
            "NAME of an environment",
        ),
        ('[cloud]\nrouting = "SOMETIMES"', "cloud.routing", "AUTO, LOCAL_ONLY, CLOUD_ONLY"),
        ('[cloud]\nsensitive = ["email", "dna"]', "cloud.sensitive", "unknown detector"),
        ('[cloud]\nsensitive_patterns = ["(unclosed"]', "cloud.sensitive", "not a valid regex"),
        ("[cloud]\nsensitive_patterns = [1]", "cloud.sensitive_patterns", "list of strings"),
        ("[cloud]\nclassify_threshold = 1.5", "cloud.classify_threshold", "between 0 and 1"),
        ("[cloud]\ndaily_cap = -1", "cloud.daily_cap", ">= 0"),
        ("[cloud]\nshadow_rate = 1.5", "cloud.shadow_rate", "between 0 and 1"),
        ("[cloud]\nshadow_rate = -0.1", "cloud.shadow_rate", "between 0 and 1"),
        ("[cloud]\nshadow_rate = 'often'", "cloud.shadow_rate", "expected float"),
        ("[cloud]\nshadow_daily_cap = -1", "cloud.shadow_daily_cap", ">= 0"),
        ('[cloud]\npre_route_tasks = ["embed"]', "cloud.pre_route_tasks", "unknown task"),
        ("[cloud]\nbreaker_failures = 0", "cloud.breaker_failures", ">= 1"),
        ("[tasks.t]\ntext_column = 'x'", "tasks.t.file", "required"),
        ("[tasks.t]\nfile = 'a.csv'\nmodel = 'nope'", "tasks.t.model", "no [models.nope]"),
        ("[tasks.t]\nfile = 'a.csv'\nthreshold = 2.0", "tasks.t.threshold", "-1 or between"),
        ("[tasks.t]\nfile = 'a.csv'\nk = 3", "tasks.t.k", "unknown key"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, toml: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(Overrides(config=write(tmp_path, toml)), env={})
    assert e.value.key == key and problem in e.value.problem
