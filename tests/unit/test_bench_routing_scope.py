"""The out-of-scope part of bench-routing is honest: a scored intent's rows never reach a
task, the none examples come only from the other left-out intents, and the figures are
computed as the table says."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import routing_scope as scope

INTENTS = [f"intent{i}" for i in range(20)]
TRAIN = [(f"train {y} {k}", y) for y in INTENTS for k in range(40)]
TEST = [(f"test {y} {k}", y) for y in INTENTS for k in range(5)]


def test_draws_are_seeded_and_split_the_left_out_intents() -> None:
    a, b = scope.draws(INTENTS, 2), scope.draws(INTENTS, 2)
    assert a == b and a[0].left_out != a[1].left_out
    for d in a:
        assert len(d.left_out) == scope.LEFT_OUT and not set(d.scored) & set(d.none)


def test_no_scored_intent_reaches_a_task_and_none_rows_come_from_the_others(
    tmp_path: Path,
) -> None:
    (draw,) = scope.draws(INTENTS, 1)
    toml, names = scope.write_tasks(tmp_path, TRAIN, draw)
    assert names == ["oos0", "oos0n"] and 'none_label = "__none__"' in toml
    for name in names:
        with (tmp_path / f"{name}.csv").open() as f:
            rows = [(r["text"], r["category"]) for r in csv.DictReader(f)]
        texts = {t for t, _ in rows}
        assert not any(y in draw.scored for _, y in rows)
        assert not any(f"train {y} " in t for t in texts for y in draw.scored)
        nones = [t for t, y in rows if y == scope.NONE_LABEL]
        if name.endswith("n"):
            assert len(nones) == scope.NONE_PER * len(draw.none)
            assert all(any(f"train {y} " in t for y in draw.none) for t in nones)
        else:
            assert nones == [] and not any(y in draw.none for _, y in rows)
    queries = scope.queries(TEST, draw, in_scope=1000)
    outside = [t for t, gold in queries if gold == ""]
    assert len(outside) == 5 * len(draw.scored)
    assert not any(y in draw.none for t, y in queries)  # the none intents are never scored


def test_the_figures_at_the_threshold() -> None:
    def rec(gold: str, label: str, p: float, novelty: float, oos: bool) -> dict[str, object]:
        return {"gold": gold, "label": label, "p": p, "novelty": novelty, "oos": oos}

    records = [
        rec("a", "a", 0.9, 0.1, False),  # kept, right
        rec("a", "b", 0.8, 0.2, False),  # kept, wrong
        rec("b", "b", 0.5, 0.3, False),  # below the threshold
        rec("b", "b", 0.9, 0.97, True),  # flagged: not kept
        rec("", "a", 0.95, 0.99, True),  # out of scope, flagged
        rec("", "b", 0.9, 0.5, False),  # out of scope, kept
    ]
    r = scope.summarise(records, 0.7)
    assert r["oos_kept"] == 0.5 and r["oos_kept_confidence_only"] == 1.0
    assert r["in_kept"] == 0.5 and r["in_kept_accuracy"] == 0.5 and r["in_flagged"] == 0.25
    # novelty: in-scope (0.1, 0.2, 0.3, 0.97) vs out (0.99, 0.5): 7 of 8 pairs ordered.
    assert r["auroc"] == pytest.approx(7 / 8)
    # Other operating points from the same replies: alpha 0.3 also flags novelty > 0.7
    # (nothing more here: 0.5 stays kept); threshold 0.5 keeps the 0.5 row.
    assert r["sweep"]["t0.7_a0.05"]["oos_kept"] == r["oos_kept"]
    assert r["sweep"]["t0.7_a0.3"]["oos_kept"] == 0.5
    assert r["sweep"]["t0.5_a0.05"]["in_kept"] == 0.75
    assert r["sweep"]["t0.8_a0.05"]["in_kept"] == 0.5
    both = scope.average([r, r])
    assert both["sweep"]["t0.5_a0.05"]["in_kept"] == 0.75 and both["oos_kept"] == 0.5
    assert "threshold 0.5" in scope.table(
        {"draws": [0, 1], "threshold": 0.7, "without_none": both, "with_none": both}
    )
    near = scope.summarise([rec("", "a", 0.9, 0.85, False), rec("a", "a", 0.9, 0.1, False)], 0.7)
    assert near["sweep"]["t0.7_a0.05"]["oos_kept"] == 1.0
    assert near["sweep"]["t0.7_a0.2"]["oos_kept"] == 0.0  # novelty 0.85 > 1 - 0.2
    assert near["sweep"]["t0.7_a0.2"]["in_kept"] == 1.0
