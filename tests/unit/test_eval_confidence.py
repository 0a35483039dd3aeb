"""The confidence metrics `sidecar eval` and the routing benchmarks share, against counts
done by hand."""

from __future__ import annotations

import numpy as np
import pytest

from sidecar.evaluation import confidence as cf


def test_auroc_matches_counting_pairs() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=40).round(1), (rng.normal(size=30) + 1).round(1)
    pairs = [(x < y) + 0.5 * (x == y) for x in a for y in b]
    assert cf.auroc(a, b) == pytest.approx(np.mean(pairs))
    assert cf.auroc([0.0, 0.1], [0.5, 0.9]) == 1.0
    assert np.isnan(cf.auroc([], [0.5]))


def test_separation_is_how_often_a_right_reply_is_surer_than_a_wrong_one() -> None:
    conf = [0.9, 0.8, 0.7, 0.6]
    assert cf.separation(conf, [True, True, False, False]) == 1.0
    assert cf.separation(conf, [False, False, True, True]) == 0.0
    # right at 0.9 and 0.6, wrong at 0.8 and 0.7: 2 of 4 pairs ordered right
    assert cf.separation(conf, [True, False, False, True]) == 0.5
    assert np.isnan(cf.separation(conf, [True] * 4))  # nothing to separate


def test_ece_and_the_reliability_bins_it_sums() -> None:
    conf = np.array([0.9] * 10)
    assert cf.expected_calibration_error(conf, [True] * 9 + [False]) == pytest.approx(0.0)
    assert cf.expected_calibration_error(conf, [False] * 10) == pytest.approx(0.9)
    conf = np.array([0.0, 0.05, 0.95, 1.0])
    bins = cf.reliability_bins(conf, [False, True, True, True], bins=10)
    # 0.0 falls in the first bin (closed at 0), 1.0 in the last
    assert [(b["lo"], b["count"]) for b in bins] == [(0.0, 2), (pytest.approx(0.9), 2)]
    assert bins[0]["accuracy"] == 0.5 and bins[0]["confidence"] == pytest.approx(0.025)
    ece = 0.5 * abs(0.025 - 0.5) + 0.5 * abs(0.975 - 1.0)
    assert cf.expected_calibration_error(conf, [False, True, True, True], 10) == pytest.approx(ece)
    assert np.isnan(cf.expected_calibration_error([], []))
    with pytest.raises(ValueError, match="2 confidences for 1 outcomes"):
        cf.expected_calibration_error([0.1, 0.2], [True])


def test_coverage_curve_keeps_the_surest_first() -> None:
    conf = [0.1, 0.9, 0.8, 0.3, 0.7]
    ok = [False, True, True, False, False]
    rows = cf.coverage_curve(conf, ok, (0.4, 0.6, 1.0))
    assert rows == [
        {"coverage": 0.4, "accuracy": 1.0, "threshold": 0.8},
        {"coverage": 0.6, "accuracy": pytest.approx(2 / 3), "threshold": 0.7},
        {"coverage": 1.0, "accuracy": 0.4, "threshold": 0.1},
    ]
    # a quality per row (an extraction's field F1) is averaged the same way
    assert cf.coverage_curve(conf, [0, 1, 0.5, 0, 0], (0.4,))[0]["accuracy"] == 0.75


def test_a_threshold_keeps_what_is_at_least_as_sure() -> None:
    conf = [0.1, 0.9, 0.8, 0.3, 0.7]
    ok = [False, True, True, False, False]
    assert cf.at_threshold(conf, ok, 0.7) == {
        "threshold": 0.7, "coverage": 0.6, "accuracy": pytest.approx(2 / 3)}  # fmt: skip
    assert np.isnan(cf.at_threshold(conf, ok, 0.95)["accuracy"])


def test_the_fitted_threshold_keeps_the_most_at_the_target() -> None:
    conf = [0.95, 0.9, 0.85, 0.8, 0.6, 0.5, 0.4]
    ok = [True, True, False, True, True, False, False]
    # kept accuracies by threshold: .95 1/1, .9 2/2, .85 2/3, .8 3/4, .6 4/5, .5 4/6, .4 4/7
    assert cf.threshold_for_accuracy(conf, ok, 0.8) == {
        "threshold": 0.6, "coverage": pytest.approx(5 / 7), "accuracy": 0.8}  # fmt: skip
    assert cf.threshold_for_accuracy(conf, ok, 0.75)["threshold"] == 0.6  # type: ignore[index]
    assert cf.threshold_for_accuracy(conf, ok, 1.0)["threshold"] == 0.9  # type: ignore[index]
    assert cf.threshold_for_accuracy(conf, [False] * 7, 0.5) is None
    # ties are kept or dropped together
    tied = cf.threshold_for_accuracy([0.9, 0.7, 0.7], [True, True, False], 0.9)
    assert (
        tied is not None and tied["threshold"] == 0.9 and tied["coverage"] == pytest.approx(1 / 3)
    )
