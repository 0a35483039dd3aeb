"""The fitted-thresholds state file: entries kept across saves, a damaged file ignored (the
config's thresholds apply) and reported, changes picked up once the check interval passes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.evaluation import confidence as cf
from sidecar.router import fitted


def entry(t: float) -> fitted.Fitted:
    return fitted.Fitted(t, 0.9, 0.92, 0.6, 40, "m@abc", "set.csv", "2025-01-02T03:04:05Z")


def test_save_keeps_other_entries_and_replaces_its_own(tmp_path: Path) -> None:
    path = tmp_path / "router" / "thresholds.json"
    fitted.save(path, "extract:m", entry(-0.4))
    fitted.save(path, "task:t", entry(0.8))
    fitted.save(path, "extract:m", entry(-0.3))
    got = fitted.read(path)
    assert got == {"extract:m": entry(-0.3), "task:t": entry(0.8)}
    assert not list(path.parent.glob("*.partial"))
    assert fitted.key("classify", task="t", model="m") == "task:t"
    assert fitted.key("extract", model="m") == "extract:m"


@pytest.mark.parametrize("text", ["{nope", '{"thresholds": 3}', '{"thresholds": {"k": {"x": 1}}}',
                                  '{"thresholds": {"k": {"threshold": "high", "target_accuracy": 0.9, '
                                  '"accuracy": 1, "kept_local": 1, "rows": 30}}}'])  # fmt: skip
def test_a_damaged_file_is_ignored_and_reported(tmp_path: Path, text: str) -> None:
    path = tmp_path / "thresholds.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=str(path)):
        fitted.read(path)
    live = fitted.FittedThresholds(path)
    assert live.get("k") is None
    assert live.report()["(error)"].startswith(f"ignored: {path}")
    fitted.save(path, "k", entry(0.5))  # a new fit replaces it
    live.reload()
    assert live.get("k") == entry(0.5) and "(error)" not in live.report()


def test_a_change_is_seen_once_the_check_interval_passed(tmp_path: Path) -> None:
    path = tmp_path / "thresholds.json"
    now = [0.0]
    live = fitted.FittedThresholds(path, clock=lambda: now[0])
    assert live.get("k") is None
    fitted.save(path, "k", entry(0.5))
    now[0] += fitted.CHECK_EVERY_S / 2
    assert live.get("k") is None  # not checked yet: the request path stats at most 1/s
    now[0] += fitted.CHECK_EVERY_S
    assert live.get("k") == entry(0.5)
    doc = json.loads(path.read_text())
    assert doc["version"] == fitted.VERSION and doc["thresholds"]["k"]["threshold"] == 0.5


def test_best_accuracy_and_the_threshold_for_a_target() -> None:
    conf = [0.9, 0.9, 0.8, 0.7, 0.6]
    ok = [1, 0, 1, 1, 0]
    assert cf.best_accuracy(conf, ok) == pytest.approx(0.75)  # the ties at 0.9 go together
    assert cf.threshold_for_accuracy(conf, ok, 0.76) is None
    got = cf.threshold_for_accuracy(conf, ok, 0.75)
    assert got == {"threshold": 0.7, "coverage": 0.8, "accuracy": 0.75}
