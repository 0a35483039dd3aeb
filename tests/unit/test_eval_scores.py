"""Accuracy, macro-F1, the confusion of the most confused labels and per-field F1 of
extracted JSON, against counts done by hand."""

from __future__ import annotations

import math

import pytest

from sidecar.evaluation import scores as sc

GOLD = ["a", "a", "a", "b", "b", "c"]
PRED = ["a", "a", "b", "b", "c", "c"]


def test_accuracy_and_macro_f1() -> None:
    assert sc.accuracy(GOLD, PRED) == pytest.approx(4 / 6)
    labels = sc.per_label(GOLD, PRED)
    # a: tp 2 fp 0 fn 1 -> 0.8; b: tp 1 fp 1 fn 1 -> 0.5; c: tp 1 fp 1 fn 0 -> 2/3
    assert labels["a"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1": 0.8,
                           "support": 3}  # fmt: skip
    assert sc.macro_f1(GOLD, PRED) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # an answer that is no gold label (empty: none of these) lowers only the gold's recall
    assert sc.per_label(["a", "b"], ["", "b"])["a"]["f1"] == 0.0
    assert math.isnan(sc.accuracy([], [])) and math.isnan(sc.macro_f1([], []))


def test_confusion_shows_the_labels_most_involved_in_mistakes() -> None:
    gold = ["a"] * 5 + ["b"] * 3 + ["c"] * 4 + ["d"]
    pred = ["a"] * 5 + ["c", "c", "b"] + ["b", "c", "c", "c"] + ["x"]
    m = sc.confused(gold, pred, most=2)
    assert m["labels"] == ["b", "c"]  # 3 mistakes each; a has none
    # rows gold b, c; columns b, c, other
    assert m["matrix"] == [[1, 2, 0], [1, 3, 0]]
    assert sc.confused(["a", "b"], ["a", "b"], 5)["labels"] == ["a", "b"]  # no mistakes


def test_values_compare_after_normalising() -> None:
    assert sc.normalise("  Table  for\tTwo ") == "table for two"
    assert sc.normalise(2.0) == 2 and sc.normalise(2.5) == 2.5
    assert sc.normalise("") is None and sc.normalise(True) is True
    assert sc.normalise({"b": "X", "a": 1}) == sc.normalise({"a": 1.0, "b": "x"})


def test_field_scores_count_a_wrong_value_as_both_errors() -> None:
    expected = [{"name": "Ann", "people": 2, "date": None},
                {"name": "Bob", "people": 4, "date": "friday"},
                {"name": "Cy", "people": 3, "date": "monday"}]  # fmt: skip
    got = [{"name": "ann", "people": 2, "date": None},  # exact
           {"name": "Bob", "people": 5},  # people wrong, date missing
           None]  # fmt: skip # no JSON object at all
    s = sc.field_scores(expected, got)
    assert s["row_exact"] == [True, False, False] and s["exact_match"] == pytest.approx(1 / 3)
    # people: tp 1, fp 1, fn 2 -> 2/5; date: tp 0, fn 2 -> 0; name: tp 2, fn 1 -> 0.8
    assert s["fields"]["people"]["f1"] == pytest.approx(0.4)
    assert s["fields"]["date"]["f1"] == 0.0 and s["fields"]["date"]["support"] == 2
    assert s["fields"]["name"]["f1"] == pytest.approx(0.8)
    # all fields: tp 3, fp 1, fn 5 -> 6/12
    assert s["field_f1"] == pytest.approx(0.5)
    assert s["row_f1"] == [1.0, pytest.approx(2 / 5), 0.0]  # row 2: tp 1, fp 1, fn 2
    # a row with nothing to find, and nothing found, is right
    assert sc.field_scores([{"a": None}], [{}])["row_f1"] == [1.0]


def test_latency_percentiles() -> None:
    lat = sc.latency([float(i) for i in range(1, 101)])
    assert lat["p50_ms"] == pytest.approx(50.5) and lat["p99_ms"] == pytest.approx(99.01)
    assert math.isnan(sc.latency([])["p50_ms"])
