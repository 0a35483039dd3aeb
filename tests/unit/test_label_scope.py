"""The zero-shot novelty, on crafted label log-probabilities: the more of the model's
probability goes to answering with some label (per label token), the less novel; the
features the benchmark compares are what they say; and the number stays in [0, 1]."""

from __future__ import annotations

import math

import pytest

from sidecar.worker.label_scope import MASS_MID, features, mass_novelty, novelty


def lp(*probs: float) -> list[float]:
    return [math.log(p) for p in probs]


def test_features_of_a_peaked_distribution() -> None:
    f = features(lp(0.9, 0.05, 0.05))
    assert f.top == pytest.approx(0.9)
    assert f.log_mass == pytest.approx(0.0)
    h = -(0.9 * math.log(0.9) + 2 * 0.05 * math.log(0.05)) / math.log(3)
    assert f.entropy == pytest.approx(h)
    assert features(lp(0.25, 0.25, 0.25, 0.25)).entropy == pytest.approx(1.0)


def test_less_mass_on_the_labels_is_more_novel_whatever_the_shape() -> None:
    on_labels = lp(0.8, 0.1, 0.1)
    elsewhere = [x + math.log(1e-4) for x in on_labels]  # same ratios, 1/10,000 the mass
    assert features(elsewhere).entropy == pytest.approx(features(on_labels).entropy)
    assert features(elsewhere).log_mass == pytest.approx(math.log(1e-4))
    assert novelty(elsewhere) > novelty(on_labels)
    # A flat spread with the same mass is no more novel: the spread is not used.
    flat = lp(1 / 3, 1 / 3, 1 / 3)
    assert novelty(flat) == pytest.approx(novelty(on_labels))


def test_the_mass_is_judged_per_label_token() -> None:
    # The same log-mass over labels twice as long is half as strange per token.
    logprobs = [-20.0, -21.0, -22.0]
    short, long_ = features(logprobs, [4, 4, 4]), features(logprobs, [8, 8, 8])
    assert short.per_token == pytest.approx(2 * long_.per_token)
    assert novelty(logprobs, [4, 4, 4]) > novelty(logprobs, [8, 8, 8])
    # The midpoint: a label mass of MASS_MID nats per token is novelty 0.5.
    assert novelty([-MASS_MID * 5], [5]) == pytest.approx(0.5)


def test_mass_novelty_is_monotone_and_bounded() -> None:
    values = [mass_novelty(x) for x in (0.0, 1.0, 3.0, 3.25, 4.0, 50.0, 1e9, float("inf"))]
    assert values == sorted(values)
    assert values[0] < 0.01 and values[-2] > 0.99
    assert all(0.0 <= v <= 1.0 for v in values)


@pytest.mark.parametrize(
    "logprobs",
    [
        [-0.1],  # one label: no spread to measure
        [-1e9, -1e9],
        [float("-inf"), -2.0],
        [float("-inf"), float("-inf")],
        [-700.0, -701.0, -702.0],  # far below exp's range: shifted before exp
    ],
)
def test_novelty_stays_in_the_unit_interval(logprobs: list[float]) -> None:
    assert 0.0 <= novelty(logprobs) <= 1.0
    assert 0.0 <= novelty(logprobs, [3] * len(logprobs)) <= 1.0


def test_every_label_impossible_is_as_novel_as_it_gets() -> None:
    assert novelty([float("-inf"), float("-inf")]) == pytest.approx(1.0)


def test_no_labels_is_an_error() -> None:
    with pytest.raises(ValueError):
        features([])
