"""The fitted-thresholds state file: entries kept across saves (also two saves at once), a
damaged file ignored (the config's thresholds apply), reported, and never overwritten, a bad
entry dropped alone, an entry fitted on another model version not applied, changes picked up
by the off-loop watch."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import CloudConfig
from sidecar.evaluation import confidence as cf
from sidecar.router import fitted


def entry(t: float, model: str = "m@abc") -> fitted.Fitted:
    return fitted.Fitted(t, 0.9, 0.92, 0.6, 40, model, "set.csv", "2025-01-02T03:04:05Z")


def raw(**change: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return {**asdict(entry(0.8)), **change}


def write(path: Path, entries: dict[str, Any], version: Any = fitted.VERSION) -> None:
    path.write_text(json.dumps({"version": version, "thresholds": entries}))


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
    assert fitted.key("classify", model="m") == "classify:m"
    # fitted on labels alone: says nothing of a Classify scored by inline examples
    assert fitted.key("classify", model="m", examples=True) is None


def test_the_config_threshold_is_decided_by_one_rule() -> None:
    c = CloudConfig()
    assert fitted.config_threshold("extract", c) == (
        c.extract_mean_logprob,
        "cloud.extract_mean_logprob",
    )
    assert fitted.config_threshold("classify", c) == (
        c.classify_threshold,
        "cloud.classify_threshold",
    )
    assert fitted.config_threshold("classify", c, "t", None)[1] == "cloud.classify_threshold"
    assert fitted.config_threshold("classify", c, "t", 0.4) == (0.4, "tasks.t.threshold")


DAMAGED = ["{nope", '{"version": 1, "thresholds": 3}', '{"thresholds": {}}',
           '{"version": 2, "thresholds": {}}']  # fmt: skip


@pytest.mark.parametrize("text", DAMAGED)
def test_a_damaged_file_is_ignored_reported_and_never_overwritten(
    tmp_path: Path, text: str
) -> None:
    path = tmp_path / "thresholds.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=str(path)):
        fitted.read(path)
    live = fitted.FittedThresholds(path)
    assert live.get("classify:m") is None
    assert live.report()["(error)"].startswith(f"ignored: {path}")
    # a new fit would wipe whatever else the file held: refused, the file as it was
    with pytest.raises(ValueError, match=str(path)):
        fitted.save(path, "classify:m", entry(0.5))
    assert path.read_text() == text
    path.unlink()
    fitted.save(path, "classify:m", entry(0.5))
    live.reload()
    assert live.get("classify:m") == entry(0.5) and "(error)" not in live.report()


BAD: list[tuple[str, str, dict[str, Any]]] = [
    ("target as text", "classify:m", raw(target_accuracy="0.9")),
    ("fitted_at null", "classify:m", raw(fitted_at=None)),
    ("threshold as text", "classify:m", raw(threshold="high")),
    ("threshold NaN", "classify:m", raw(threshold=float("nan"))),
    ("threshold infinite", "extract:m", raw(threshold=float("-inf"))),
    ("probability above 1", "classify:m", raw(threshold=1.5)),
    ("task below 0", "task:t", raw(threshold=-0.1)),
    ("logprob above 0", "extract:m", raw(threshold=0.5)),
    ("rows true", "classify:m", raw(rows=True)),
    ("rows fractional", "classify:m", raw(rows=4.5)),
    ("accuracy above 1", "classify:m", raw(accuracy=2)),
    ("model a number", "classify:m", raw(model=3)),
    ("unknown field", "classify:m", raw(colour="blue")),
    ("no threshold", "classify:m", {k: v for k, v in raw().items() if k != "threshold"}),
    ("unknown kind", "generate:m", raw()),
    ("not an object", "classify:m", [0.8]),  # type: ignore[dict-item]
]  # fmt: skip


@pytest.mark.parametrize(("name", "bad"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_entry_is_dropped_alone_and_reported(tmp_path: Path, name: str, bad: Any) -> None:
    path = tmp_path / "thresholds.json"
    # Python's json writes and reads NaN and Infinity: a hand edit can hold them
    write(path, {name: bad, "task:good": raw(threshold=0.6)})
    live = fitted.FittedThresholds(path)
    assert live.get(name, "m@abc") is None  # the config's threshold applies to this key
    good = live.get("task:good", "m@abc")
    assert good is not None and good.threshold == 0.6
    report = live.report()  # status works
    assert report["task:good"].startswith("0.6 fitted (task:good")
    assert name not in report and f"entry {name!r}" in report["(error)"]
    with pytest.raises(ValueError, match=f"entry {name!r}"):
        fitted.read(path)


def test_an_entry_fitted_on_another_version_does_not_apply_and_status_says_stale(
    tmp_path: Path,
) -> None:
    path = tmp_path / "thresholds.json"
    fitted.save(path, "classify:m", entry(0.9, "m@abc"))
    fitted.save(path, "task:t", entry(0.8, "m@abc"))
    live = fitted.FittedThresholds(path)
    assert live.get("classify:m", "m@abc") == entry(0.9, "m@abc")
    assert live.get("classify:m", "m@def") is None  # swapped: the config applies
    assert live.get("task:t", "m@def") is None  # a task's answers come from a model too
    report = live.report()
    assert report["classify:m"] == "0.9 stale (fitted on m@abc, serving m@def)"
    assert report["task:t"] == "0.8 stale (fitted on m@abc, serving m@def)"
    assert live.get("classify:m", "m@abc") is not None  # swapped back
    assert live.report()["classify:m"].startswith("0.9 fitted (classify:m")


def test_two_fits_at_once_keep_both_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "thresholds.json"
    slow_write = fitted.write_atomic

    def slow(p: Path, data: bytes) -> None:
        time.sleep(0.1)  # both would have read the file before either wrote it
        slow_write(p, data)

    monkeypatch.setattr(fitted, "write_atomic", slow)
    fits = [
        threading.Thread(target=fitted.save, args=(path, f"task:t{i}", entry(0.5)))
        for i in range(3)
    ]
    for t in fits:
        t.start()
    for t in fits:
        t.join()
    assert sorted(fitted.read(path)) == ["task:t0", "task:t1", "task:t2"]


def test_a_same_size_rewrite_within_one_mtime_tick_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "thresholds.json"
    fitted.save(path, "classify:m", entry(0.5))
    live = fitted.FittedThresholds(path)
    before = os.stat(path)
    fitted.save(path, "classify:m", entry(0.6))  # same length
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size == before.st_size
    live.reload()
    assert live.get("classify:m") == entry(0.6)


async def test_the_request_path_reads_memory_and_the_watch_reads_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "thresholds.json"
    live = fitted.FittedThresholds(path)
    fitted.save(path, "classify:m", entry(0.5))
    on_loop = threading.get_ident()
    reads: list[int] = []
    real_stat = os.stat

    def stat(p: Any, *a: Any, **kw: Any) -> os.stat_result:
        if str(p) == str(path):
            reads.append(threading.get_ident())
        return real_stat(p, *a, **kw)

    monkeypatch.setattr(fitted.os, "stat", stat)
    assert live.get("classify:m") is None and not reads  # no file access on get
    watch = asyncio.ensure_future(live.watch(every=0.01))
    try:
        for _ in range(200):
            if live.get("classify:m") is not None:
                break
            await asyncio.sleep(0.01)
    finally:
        watch.cancel()
    assert live.get("classify:m") == entry(0.5)
    assert reads and on_loop not in reads  # read from a thread, never on the loop


def test_best_accuracy_and_the_threshold_for_a_target() -> None:
    conf = [0.9, 0.9, 0.8, 0.7, 0.6]
    ok = [1, 0, 1, 1, 0]
    assert cf.best_accuracy(conf, ok) == pytest.approx(0.75)  # the ties at 0.9 go together
    assert cf.threshold_for_accuracy(conf, ok, 0.76) is None
    got = cf.threshold_for_accuracy(conf, ok, 0.75)
    assert got == {"threshold": 0.7, "coverage": 0.8, "accuracy": 0.75}
