"""The shipped Prometheus alerting rules: valid for promtool, unit-tested with promtool, and
covering what an operator watches. promtool comes with Debian's `prometheus` package
(`SIDECAR_TEST_TOOLS=1 scripts/setup` installs it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from promql import RULES, parse, rule_queries

RULE_TESTS = RULES.with_name("sidecar-alerts.test.yml")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian's prometheus package; "
    "SIDECAR_TEST_TOOLS=1 scripts/setup installs it as root)",
)


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


@needs_promtool
def test_the_rules_pass_promtool_check_rules() -> None:
    r = promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(list(rule_queries()))} rules found" in r.stdout


@needs_promtool
def test_promtool_check_rules_refuses_a_broken_expression(tmp_path: Path) -> None:
    broken = tmp_path / "rules.yml"
    broken.write_text(RULES.read_text().replace("sidecar_shedding == 1", "sidecar_shedding == ("))
    r = promtool("check", "rules", str(broken))
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert '"SidecarShedding": could not parse expression' in out and "parse error" in out


@needs_promtool
def test_the_alert_unit_tests_pass_promtool_test_rules() -> None:
    r = promtool("test", "rules", RULE_TESTS.name, cwd=RULES.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


@needs_promtool
def test_the_alert_unit_tests_fail_when_an_alert_loses_its_grace_period(tmp_path: Path) -> None:
    # SidecarModelNotServing without `for: 2m` would page at the first bad scrape: the
    # unit test that expects silence at 3m (one minute after the drop) must catch it.
    text = RULES.read_text()
    rule = text.index("alert: SidecarModelNotServing")
    cut = text.index("for: 2m", rule)
    (tmp_path / RULES.name).write_text(text[:cut] + "for: 0m" + text[cut + len("for: 2m") :])
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    r = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert r.returncode != 0
    assert "SidecarModelNotServing" in r.stdout + r.stderr


def test_every_alert_has_a_severity_a_summary_and_a_description() -> None:
    text = RULES.read_text()
    blocks = re.split(r"\n\s*- alert: ", text)[1:]
    names = [b.split("\n", 1)[0].strip() for b in blocks]
    assert len(names) == len(set(names)) == len(list(rule_queries()))
    for name, block in zip(names, blocks, strict=True):
        assert re.search(r"severity: (critical|warning)", block), name
        assert "summary:" in block and "description:" in block, name


def test_the_rules_cover_what_an_operator_watches() -> None:
    queried = {s.name for q in rule_queries() for s in q.selectors}
    watched = {
        "readiness": "sidecar_model_serving",
        "the daemon answering at all": "up",
        "restarts": "sidecar_worker_restarts_total",
        "queue depth": "sidecar_queue_depth",
        "shedding": "sidecar_shedding",
        "refused requests": "sidecar_requests_total",
        "latency": "sidecar_request_seconds_bucket",
        "escalation rate and blocked escalations": "sidecar_routed_total",
        "cloud spend against caps": "sidecar_cloud_budget_cap",
        "cloud breaker": "sidecar_cloud_breaker_state",
        "update outcomes": "sidecar_update_rejections_total",
        "swap outcomes": "sidecar_swaps_total",
    }
    missing = {what: name for what, name in watched.items() if name not in queried}
    assert missing == {}


# ------------------------------------------------------------ the PromQL tokenizer the
# service test (tests/service/test_dashboards.py) relies on


def test_the_tokenizer_finds_series_not_functions_keywords_numbers_or_ranges() -> None:
    q = parse(
        'histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{status="OK",'
        'model=~"$model"}[$__rate_interval]))) > 1e3 and on (job) b offset 1h unless c:d'
    )
    assert [s.name for s in q.selectors] == ["a_bucket", "b", "c:d"]
    assert q.selectors[0].matchers == [("status", "=", "OK"), ("model", "=~", "$model")]
    assert q.grouping == {"le", "model", "job"}


def test_the_tokenizer_reads_block_scalar_expressions() -> None:
    rules = (
        "groups:\n  - rules:\n      - alert: X\n        expr: |\n          sum(x_total)\n"
        "            / sum(y_total) > 0.5\n        for: 1m\n      - alert: Y\n        expr: z == 0\n"
    )
    got = [(q.where, [s.name for s in q.selectors]) for q in rule_queries(rules)]
    assert got == [("rule X", ["x_total", "y_total"]), ("rule Y", ["z"])]
