"""Smoke tests of the benchmarks package: every benchmark imports and parses its command
line, the `scripts/` entry points run the module they name, and the shared helpers compute
what they claim. No benchmark is run here (they take minutes and real models)."""

from __future__ import annotations

import importlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.common import cpu_model  # noqa: E402
from benchmarks.procs import Children, run  # noqa: E402
from benchmarks.report import Col, Table, write_json  # noqa: E402
from benchmarks.stats import dist, median_ci, percentile  # noqa: E402

# scripts/ entry point -> the module it runs
ENTRY_POINTS = {
    "bench": "serving",
    "bench-adapters": "adapters",
    "bench-delta": "delta",
    "bench-encryption": "encryption",
    "bench-gate": "gate",
    "bench-cores": "cores",
    "bench-privacy": "privacy",
    "bench-routing": "routing",
    "bench-swap": "swap",
    "bench-transport": "transport",
    "bench-zero-shot-scope": "zero_shot_scope",
    "soak": "soak",
}


@pytest.mark.parametrize(("script", "module"), sorted(ENTRY_POINTS.items()))
def test_benchmark_imports_and_prints_its_help(
    script: str, module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    mod = importlib.import_module(f"benchmarks.{module}")
    with pytest.raises(SystemExit) as exit_:
        mod.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: scripts/{script} ")
    assert "--out" in out  # every benchmark can write its JSON elsewhere


@pytest.mark.parametrize(("script", "module"), sorted(ENTRY_POINTS.items()))
def test_entry_point_runs_its_module_from_the_repo_root(script: str, module: str) -> None:
    path = REPO / "scripts" / script
    text = path.read_text()
    assert os.access(path, os.X_OK)
    assert text.startswith("#!/usr/bin/env bash\n")
    assert 'cd "$(dirname "$0")/.."' in text
    assert "./scripts/setup" in text
    last = text.rstrip().splitlines()[-1]
    assert last == f'exec .venv/bin/python -m benchmarks.{module} "$@"'
    assert (REPO / "benchmarks" / f"{module}.py").is_file()


def test_no_benchmark_is_left_in_scripts_as_python() -> None:
    left = [p.name for p in (REPO / "scripts").glob("*.py") if re.match(r"(bench|soak)", p.name)]
    assert left == []


def test_percentile_interpolates_between_ranks_like_numpy() -> None:
    xs = [10.0, 20.0, 30.0, 40.0]
    assert percentile(xs, 0) == 10.0
    assert percentile(xs, 50) == 25.0
    assert percentile(xs, 100) == 40.0
    assert percentile(xs, 99) == pytest.approx(39.7)
    assert percentile([40.0, 10.0, 30.0, 20.0], 50) == 25.0  # order does not matter
    rng = random.Random(3)
    data = [rng.expovariate(1.0) for _ in range(501)]
    for q in (1, 25, 50, 90, 99, 99.9):
        assert percentile(data, q) == pytest.approx(float(np.percentile(data, q)))


def test_percentile_of_nothing_is_nan() -> None:
    assert np.isnan(percentile([], 50))


def test_dist_summarises_known_samples() -> None:
    d = dist([float(x) for x in range(1, 101)], nd=1)
    assert d == {"n": 100, "p50": 50.5, "p99": 99.0, "min": 1.0, "max": 100.0, "mean": 50.5}
    assert dist([]) == {"n": 0}


def test_median_ci_brackets_the_median_and_is_reproducible() -> None:
    rng = random.Random(1)
    xs = [rng.gauss(100.0, 5.0) for _ in range(200)]
    lo, hi = median_ci(xs, n=500)
    assert lo < float(np.median(xs)) < hi
    assert hi - lo < 5.0
    assert median_ci(xs, n=500) == [lo, hi]


def test_table_aligns_columns_and_never_cuts_a_cell() -> None:
    t = Table(Col(8), Col(6, ">", gap=1), Col(0, gap=3))
    t.line("title")
    t.row("metric", "value", "target")
    t.rule()
    t.row("p50", 12.5, ">= 10")
    t.row("a-long-metric", "1", "")
    t.row("skipped", tail="  not installed")
    assert t.render().splitlines() == [
        "title",
        "metric    value   target",
        "-------  -----",
        "p50        12.5   >= 10",
        "a-long-metric      1",
        "skipped   not installed",
    ]


def test_table_refuses_more_cells_than_columns() -> None:
    with pytest.raises(ValueError, match="3 cells for 2 columns"):
        Table(Col(4), Col(4)).row("a", "b", "c")


def test_cpu_model_is_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Example CPU @ 2.0GHz\n")
    assert cpu_model(info) == "Example CPU @ 2.0GHz"
    assert cpu_model(tmp_path / "missing")  # falls back to what platform knows


def test_json_carries_the_results_cpu_model_and_time(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "bench.json"
    write_json(out, {"cases": {"a": {"median_us": 1.5}}})
    doc = json.loads(out.read_text())
    assert doc["cases"] == {"a": {"median_us": 1.5}}
    assert doc["cpu_model"] == cpu_model() != ""
    written = time.mktime(time.strptime(doc["timestamp"], "%Y-%m-%dT%H:%M:%SZ"))
    assert abs(written - time.mktime(time.gmtime())) < 60
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # no .partial left


def test_closing_children_stops_those_still_running() -> None:
    with Children() as children:
        p = children.spawn([sys.executable, "-c", "import time; time.sleep(60)"])
        assert p.poll() is None
    assert p.returncode == -signal.SIGTERM
    assert children.procs == []


@pytest.fixture
def signal_handlers() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.usefixtures("signal_handlers")
def test_ctrl_c_exits_130_after_cleanup_ran() -> None:
    cleaned: list[str] = []

    def main(_argv: list[str] | None) -> int:
        try:
            raise KeyboardInterrupt
        finally:
            cleaned.append("finally")

    assert run(main) == 130
    assert cleaned == ["finally"]


@pytest.mark.usefixtures("signal_handlers")
def test_sigterm_unwinds_the_benchmark_and_stops_its_children() -> None:
    seen: list[subprocess.Popen[bytes]] = []

    def main(_argv: list[str] | None) -> int:
        with Children() as children:
            seen.append(children.spawn([sys.executable, "-c", "import time; time.sleep(60)"]))
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
        return 0

    with pytest.raises(SystemExit) as exit_:
        run(main)
    assert exit_.value.code == 128 + signal.SIGTERM
    assert seen[0].poll() is not None
