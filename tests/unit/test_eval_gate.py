"""The eval gate's pure parts: the bars, the per-version score cache, reading the golden set,
the config that names it, and the latency windows probation compares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.config import Overrides, TaskConfig, load
from sidecar.domain.errors import ConfigError, FailedPrecondition
from sidecar.engine.gate import Bars, Score, ScoreCache, load_golden, verdict
from sidecar.engine.latency import MIN_SAMPLES, VERSIONS, WINDOW, Latencies

# ------------------------------------------------------------------ the bars


@pytest.mark.parametrize(
    ("candidate", "serving", "bars", "refused"),
    [
        (Score(12, 20), Score(12, 20), Bars(0.6, 0.0), None),  # exactly at both bars
        (Score(11, 20), Score(12, 20), Bars(0.0, 0.05), None),  # one row of 20 = 0.05 allowed
        (Score(10, 20), Score(12, 20), Bars(0.0, 0.05), "eval_max_regression 0.05"),
        (Score(11, 20), Score(12, 20), Bars(0.6, 1.0), "eval_min_accuracy 0.6"),
        (Score(5, 20), None, Bars(0.0, 0.0), None),  # serving unknown: only the floor
        (Score(5, 20), None, Bars(0.3, 0.0), "eval_min_accuracy 0.3"),
        (Score(20, 20), Score(10, 20), Bars(1.0, 0.0), None),  # better than serving
        (Score(0, 20), Score(0, 20), Bars(0.0, 0.0), None),  # no bar set: nothing refused
    ],
)
def test_verdict_refuses_below_the_floor_or_beyond_the_regression(
    candidate: Score, serving: Score | None, bars: Bars, refused: str | None
) -> None:
    got = verdict(candidate, serving, bars)
    if refused is None:
        assert got is None
    else:
        assert got is not None and refused in got


def test_score_shows_accuracy_and_rows() -> None:
    assert Score(17, 24).shown() == "0.708 (17/24)"
    assert Score(0, 0).accuracy == 0.0  # never a division by zero


# ------------------------------------------------------------------ the cache


def test_cache_misses_hits_and_forgets_scores_of_another_golden_set(tmp_path: Path) -> None:
    cache = ScoreCache(tmp_path / "eval" / "m" / "scores.json")
    a, b = "a" * 64, "b" * 64
    assert cache.get(a, "g1") is None  # no file yet
    cache.put(a, "g1", Score(7, 10), "bank")
    assert cache.get(a, "g1") == Score(7, 10)
    assert cache.get(b, "g1") is None  # another version
    assert cache.get(a, "g2") is None  # the golden set changed: stale
    doc = json.loads(cache.path.read_text())
    assert doc[a]["accuracy"] == 0.7 and doc[a]["task"] == "bank" and doc[a]["date"]
    cache.put(b, "g2", Score(3, 10), "bank")  # scores of the old set are dropped
    assert cache.get(a, "g1") is None and cache.get(b, "g2") == Score(3, 10)
    assert set(json.loads(cache.path.read_text())) == {b}


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"%s": {"golden": "g"}}' % ("a" * 64)])
def test_a_damaged_cache_is_a_miss_never_an_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "scores.json"
    path.write_text(text)
    cache = ScoreCache(path)
    assert cache.get("a" * 64, "g") is None
    cache.put("a" * 64, "g", Score(1, 2), "t")  # and it is rewritten whole
    assert cache.get("a" * 64, "g") == Score(1, 2)


# ------------------------------------------------------------------ the golden set


def _task(tmp_path: Path, rows: str, **kw: str) -> TaskConfig:
    golden = tmp_path / "golden.csv"
    golden.write_text(rows)
    return TaskConfig(name="bank", file=golden, eval_file=golden, **kw)  # type: ignore[arg-type]


def test_golden_set_rows_labels_and_a_digest_of_what_is_asked(tmp_path: Path) -> None:
    task = _task(tmp_path, "text,label\nlost my card,lost\nrate?,rate\nstolen,lost\n")
    g = load_golden(task)
    assert g.rows == (("lost my card", "lost"), ("rate?", "rate"), ("stolen", "lost"))
    assert g.labels == ("lost", "rate")
    again = load_golden(task)
    assert again.digest == g.digest
    other = load_golden(TaskConfig(**{**task.__dict__, "instruction": "Which intent?"}))
    assert other.digest != g.digest  # a new instruction: other answers, other scores
    (tmp_path / "golden.csv").write_text("text,label\nlost my card,lost\nrate?,rate\n")
    assert load_golden(task).digest != g.digest


def test_golden_set_uses_the_task_columns(tmp_path: Path) -> None:
    rows = "q,intent,other\nhi,greet,leave\nbye,leave,greet\n"
    task = _task(tmp_path, rows, text_column="q", label_column="intent")
    g = load_golden(task)
    assert g.rows == (("hi", "greet"), ("bye", "leave"))
    # The same file read through other columns is another golden set: another digest.
    other = load_golden(TaskConfig(**{**task.__dict__, "label_column": "other"}))
    assert other.rows == (("hi", "leave"), ("bye", "greet")) and other.digest != g.digest


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        ("text,label\nonly,one\n", "at least 2"),
        ("text,category\na,b\n", "no label column"),
        ("text,label\n,x\n", "the text is empty"),
        (None, "cannot read"),
    ],
)
def test_an_unusable_golden_set_stops_the_swap_before_any_candidate(
    tmp_path: Path, rows: str | None, problem: str
) -> None:
    task = _task(tmp_path, rows or "")
    if rows is None:
        (tmp_path / "golden.csv").unlink()
    with pytest.raises(FailedPrecondition) as e:
        load_golden(task)
    assert "golden set (task 'bank')" in e.value.message and problem in e.value.message


# ------------------------------------------------------------------ the config


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "g.csv").write_text("text,label\na,x\nb,y\n")
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


MODEL = '[models.m]\npath = "m.gguf"\n'


@pytest.mark.parametrize(
    ("toml", "key", "problem"),
    [
        (MODEL + 'eval = "bank"\n', "models.m.eval", "no [tasks.bank] table (known: none)"),
        (
            MODEL + 'eval = "bank"\n[tasks.other]\nfile = "g.csv"\neval_file = "g.csv"\n',
            "models.m.eval",
            "no [tasks.bank] table (known: other)",
        ),
        (
            MODEL + 'eval = "bank"\n[tasks.bank]\nfile = "g.csv"\n',
            "models.m.eval",
            "task 'bank' has no golden set: set tasks.bank.eval_file",
        ),
        (MODEL + "eval_min_accuracy = 1.5\n", "models.m.eval_min_accuracy", "between 0 and 1"),
        (MODEL + "eval_min_accuracy = -0.1\n", "models.m.eval_min_accuracy", "between 0 and 1"),
        (MODEL + "eval_max_regression = 2\n", "models.m.eval_max_regression", "between 0 and 1"),
        (
            MODEL + "probation_latency_factor = 0.5\n",
            "models.m.probation_latency_factor",
            "0 (off) or at least 1",
        ),
        (MODEL + "eval = 3\n", "models.m.eval", "expected str"),
    ],
)
def test_a_bad_gate_config_is_refused_at_load(
    tmp_path: Path, toml: str, key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as e:
        load(Overrides(config=_write(tmp_path, toml)), env={})
    assert e.value.key == key
    assert problem in e.value.problem


def test_a_gate_config_loads_with_its_bars(tmp_path: Path) -> None:
    toml = (
        MODEL
        + 'eval = "bank"\neval_min_accuracy = 0.7\neval_max_regression = 0\n'
        + "probation_latency_factor = 2.5\n"
        + '[tasks.bank]\nfile = "g.csv"\neval_file = "g.csv"\n'
    )
    cfg = load(Overrides(config=_write(tmp_path, toml)), env={})
    m = cfg.model("m")
    assert m is not None and m.eval == "bank"
    assert (m.eval_min_accuracy, m.eval_max_regression) == (0.7, 0.0)
    assert m.probation_latency_factor == 2.5
    default = load(Overrides(config=_write(tmp_path, MODEL)), env={}).model("m")
    assert default is not None and default.eval == "" and default.probation_latency_factor == 0


# ------------------------------------------------------------------ latency windows


def test_latency_p99_needs_enough_samples_and_keeps_a_bounded_window() -> None:
    lat = Latencies()
    for _ in range(MIN_SAMPLES - 1):
        lat.add("v1", 10.0)
    assert lat.p99("v1") is None and lat.p99("nope") is None
    lat.add("v1", 10.0)
    assert lat.p99("v1") == pytest.approx(10.0)
    for _ in range(WINDOW):
        lat.add("v1", 500.0)  # the old samples fall out of the window
    assert lat.samples("v1") == WINDOW and lat.p99("v1") == pytest.approx(500.0)


def test_latency_keeps_only_the_recent_versions() -> None:
    lat = Latencies()
    for i in range(VERSIONS + 2):
        lat.add(f"v{i}", 1.0)
    assert lat.samples("v0") == lat.samples("v1") == 0
    assert all(lat.samples(f"v{i}") == 1 for i in range(2, VERSIONS + 2))
