"""The out-of-scope signal: conformal p-values, the features they combine, the calibration
the fit stores (and the cache keeps), and what out-of-scope examples add."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sidecar.evaluation.confidence import auroc
from sidecar.fewshot import novelty as nv
from sidecar.fewshot import vectors as vc
from sidecar.fewshot.classifier import ExampleClassifier
from sidecar.fewshot.fit import fit
from sidecar.fewshot.vectors import VectorCache


def clusters(n_per: int, labels: int, dim: int = 16, noise: float = 0.5, seed: int = 0):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(labels, dim))
    y = np.repeat(np.arange(labels), n_per)
    x = centres[y] + noise * rng.normal(size=(len(y), dim))
    texts = [f"topic{k} word{rng.integers(5)}" for k in y]
    return x.astype(np.float32), [f"l{k}" for k in y], texts, centres


def novelty(clf: ExampleClassifier, vector: np.ndarray, text: str) -> float:
    lex = clf.lexical.similarities(text)
    x, sims = clf.similarities(vector.astype(np.float32))
    probs = clf.probabilities(clf.evidence(vector.astype(np.float32), text, None, lex, sims))
    out = nv.novelty_of(clf, text, lex, probs=probs, x=x, emb=sims)
    assert out is not None and out.novelty == 1 - out.p
    return out.novelty


def out_of_scope(clf: ExampleClassifier, vector: np.ndarray, text: str) -> bool:
    lex = clf.lexical.similarities(text)
    x, sims = clf.similarities(vector.astype(np.float32))
    probs = clf.probabilities(clf.evidence(vector.astype(np.float32), text, None, lex, sims))
    out = nv.novelty_of(clf, text, lex, probs=probs, x=x, emb=sims)
    assert out is not None
    return out.out_of_scope(nv.DEFAULT_ALPHA)


def test_the_conformal_p_value_counts_the_calibration_at_or_above() -> None:
    cal = np.arange(1.0, 11.0)  # 10 held-out scores
    assert nv.conformal(cal, 100.0) == pytest.approx(1 / 11)  # stranger than all: the floor
    assert nv.conformal(cal, -5.0) == 1.0
    assert nv.conformal(cal, 5.0) == pytest.approx(7 / 11)  # 5..10 and itself


def test_held_out_p_values_are_leave_one_out() -> None:
    rng = np.random.default_rng(0)
    cal = rng.normal(size=(50, 3))
    cal[7, 1] = cal[8, 1]  # a tie counts as >=
    got = nv.held_out_p_values(cal)
    for i in range(50):
        others = np.delete(cal, i, axis=0)
        assert np.allclose(got[i], nv.p_values(others, cal[i]))


def test_p_values_of_exchangeable_points_are_uniform_and_a_far_one_is_at_the_floor() -> None:
    # Valid over calibration sets (marginally): average over many of them.
    rng = np.random.default_rng(1)
    p = []
    for _ in range(40):
        cal = rng.normal(size=(199, 1))
        p += [nv.p_values(cal, r)[0] for r in rng.normal(size=(200, 1))]
    for a in (0.05, 0.1, 0.5):
        assert abs(float((np.array(p) <= a).mean()) - a) < 0.015
    assert nv.p_values(cal, np.array([50.0]))[0] == pytest.approx(1 / 200)


def test_far_texts_are_novel_and_in_scope_ones_are_lost_at_about_alpha() -> None:
    x, labels, texts, centres = clusters(40, 8)
    clf = ExampleClassifier(labels, x, texts)
    fit(clf, texts, size=300)
    assert clf.scope is not None and clf.scope.n == 300
    rng = np.random.default_rng(5)
    k = rng.integers(8, size=400)
    inside = [
        novelty(clf, centres[j] + 0.5 * rng.normal(size=16), f"topic{j} word{rng.integers(5)}")
        for j in k
    ]
    outside = [novelty(clf, 1.5 * rng.normal(size=16), "zzz qqq") for _ in range(100)]
    assert auroc(inside, outside) > 0.99
    lost = float(np.mean(1 - np.array(inside) < nv.DEFAULT_ALPHA))
    assert lost <= 2 * nv.DEFAULT_ALPHA  # the cut costs about alpha of in-scope texts
    assert float(np.mean(1 - np.array(outside) < nv.DEFAULT_ALPHA)) > 0.95


def test_a_small_set_cannot_call_anything_out_of_scope_below_its_floor() -> None:
    x, labels, texts, _ = clusters(6, 2)  # 12 examples: p >= 1/13 > 0.05
    clf = ExampleClassifier(labels, x, texts)
    fit(clf, texts)
    assert clf.scope is not None and clf.scope.n == 12
    far = novelty(clf, np.full(16, 40.0), "qqq zzz")
    assert far == pytest.approx(1 - 1 / 13)


def test_words_alone_answers_are_judged_by_the_lexical_features() -> None:
    x, labels, texts, _ = clusters(40, 4)
    clf = ExampleClassifier(labels, x, texts)
    fit(clf, texts, size=160)
    assert clf.scope is not None
    for text, novel in (("topic1 word2", False), ("qqqq zzzz xxxx", True)):
        lex = clf.lexical.similarities(text)
        out = nv.novelty_of(clf, text, lex, lex_probs=clf.lexical_probabilities(lex))
        assert out is not None and (out.novelty > 0.95) == novel, (text, out)


def test_texts_nearer_an_out_of_scope_example_are_out_of_scope() -> None:
    # The out-of-scope region sits between two labels, its texts worded like theirs:
    # without examples of it most of its texts pass; with them, most are caught, and
    # in-scope texts are not.
    x, labels, texts, centres = clusters(40, 6, noise=1.0)
    rng = np.random.default_rng(3)
    middle = (centres[0] + centres[1]) / 2
    none = (middle + 0.6 * rng.normal(size=(30, 16))).astype(np.float32)
    none_texts = [f"topic{i % 2} word{i % 5}" for i in range(30)]
    plain = ExampleClassifier(labels, x, texts)
    fit(plain, texts, size=240)
    informed = ExampleClassifier(labels, x, texts, none, none_texts)
    fit(informed, texts, size=240)
    assert informed.scope is not None and informed.scope.with_none
    queries = [(middle + 0.6 * rng.normal(size=16), f"topic{i % 2} word3") for i in range(60)]
    inside = [(centres[j] + rng.normal(size=16), f"topic{j} word1") for j in range(6)] * 10
    caught_plain = np.mean([out_of_scope(plain, v, t) for v, t in queries])
    caught = np.mean([out_of_scope(informed, v, t) for v, t in queries])
    lost = np.mean([out_of_scope(informed, v, t) for v, t in inside])
    assert caught_plain < 0.5 and caught > caught_plain + 0.3, (caught_plain, caught)
    assert lost < 0.15, lost


def test_the_calibration_is_cached_with_the_parameters(tmp_path: Path) -> None:
    x, labels, texts, centres = clusters(20, 4)
    clf = ExampleClassifier(labels, x, texts)
    fit(clf, texts)
    cache = VectorCache(tmp_path)
    cache.save_params("k", clf)
    assert (tmp_path / f"k.{vc.PARAMS_VERSION}.npz").exists()
    again = ExampleClassifier(labels, x, texts)
    assert cache.load_params("k", again)
    assert again.scope is not None and clf.scope is not None
    assert np.array_equal(again.scope.features, clf.scope.features, equal_nan=True)
    v = centres[2] + 3.0
    assert novelty(again, v, "topic2 word0") == novelty(clf, v, "topic2 word0")
    # A classifier with out-of-scope examples never takes parameters fitted without them.
    with_none = ExampleClassifier(labels, x, texts, x[:3], ["a", "b", "c"])
    assert not cache.load_params("k", with_none)


def test_parameters_of_an_older_fit_are_refitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, labels, texts, _ = clusters(20, 4)
    clf = ExampleClassifier(labels, x, texts)
    fit(clf, texts)
    monkeypatch.setattr(vc, "PARAMS_VERSION", "p3")
    VectorCache(tmp_path).save_params("k", clf)
    monkeypatch.undo()
    assert vc.PARAMS_VERSION != "p3"
    assert not VectorCache(tmp_path).load_params("k", ExampleClassifier(labels, x, texts))
    # A p4-named file without the calibration (written before it existed) is refitted too.
    with (tmp_path / f"k.{vc.PARAMS_VERSION}.npz").open("wb") as f:
        np.savez(f, params=np.array("{}"), w=np.zeros((16, 4)), b=np.zeros(4))
    assert not VectorCache(tmp_path).load_params("k", ExampleClassifier(labels, x, texts))


def test_a_new_set_is_seeded_with_the_vectors_other_sets_hold(tmp_path: Path) -> None:
    cache = VectorCache(tmp_path)
    rng = np.random.default_rng(0)
    old = tuple(f"text {i}" for i in range(10))
    vectors = rng.normal(size=(10, 4)).astype(np.float32)
    cache.save_vectors("a", vectors)
    cache.save_texts("a", "v1", old)
    new = ("text 3", "brand new", "text 9", "text 3")
    seeded = cache.seed("b", "v1", new)
    assert seeded is not None
    got, have = seeded
    assert have.tolist() == [True, False, True, True]
    assert np.array_equal(got[[0, 2, 3]], vectors[[3, 9, 3]])
    assert cache.seed("b", "v2", new) is None  # another model version: nothing to reuse
    assert cache.seed("c", "v1", ("unknown",)) is None


def test_relative_mahalanobis_judges_an_example_as_if_it_were_left_out() -> None:
    from sidecar.fewshot.gauss import Gaussians

    x, labels, _, centres = clusters(30, 3, dim=8)
    y = np.array([int(s[1:]) for s in labels])
    g = Gaussians(x, y)
    # Left out, example 0's own label mean moves: the distance to it must be the one the
    # other 29 examples' mean gives (under the same whitening).
    rest = x[1:30].astype(np.float64).mean(axis=0)
    z = g.w @ x[0].astype(np.float64)
    want = float(((g.w @ rest - z) ** 2).sum())
    d0 = float(((g.w0 @ x[0].astype(np.float64) - g.centre) ** 2).sum())
    others = ((g.means[1:] - z) ** 2).sum(axis=1).min()
    assert g.relative(x[0], own=0) == pytest.approx(min(want, others) - d0)
    # Far from every label, but not from the examples' spread: relative distance is large.
    near = [g.relative(c.astype(np.float32)) for c in centres]
    far = g.relative((centres[0] + centres[1] + 6 * np.ones(8)).astype(np.float32))
    assert far > max(near)


def test_identical_vectors_still_give_a_classifier() -> None:
    # Every example embedded to the same vector (a degenerate model): no singular matrix.
    x = np.ones((12, 8), np.float32)
    labels = ["a", "b"] * 6
    texts = [f"text {i}" for i in range(12)]
    clf = ExampleClassifier(labels, x, texts)
    fit(clf, texts)
    assert np.isfinite(clf.gauss.relative(x[0]))
