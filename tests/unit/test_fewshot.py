"""The example classifier's parts: lexical similarity, neighbour votes, weight fitting
(which is also the calibration), the CSV loader's errors, and the cache key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sidecar.domain.errors import FailedPrecondition, InvalidRequest
from sidecar.evaluation.confidence import expected_calibration_error
from sidecar.fewshot.classifier import ExampleClassifier, fit_weights
from sidecar.fewshot.examples import ExampleSet, check, load_csv
from sidecar.fewshot.fit import fit
from sidecar.fewshot.lexical import LexicalIndex


def test_lexical_similarity_prefers_shared_words_and_is_cosine() -> None:
    idx = LexicalIndex(["my card has not arrived", "exchange rate for euros", "reset my pin"])
    sims = idx.similarities("card not arrived yet")
    assert int(np.argmax(sims)) == 0 and 0 < sims[0] <= 1.0 + 1e-6
    assert np.allclose(idx.similarities("zzzz qqqq"), 0.0)
    assert idx.similarities("my card has not arrived")[0] == pytest.approx(1.0, abs=1e-5)


def synthetic(n_per: int, labels: int, dim: int, noise: float, seed: int = 0):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(labels, dim))
    y = np.repeat(np.arange(labels), n_per)
    x = centres[y] + noise * rng.normal(size=(len(y), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), [f"l{i}" for i in y], centres


def test_fitting_trusts_the_informative_view_and_calibrates() -> None:
    # Embeddings carry the signal; the texts are noise words. The fitted weights must lean
    # on the embedding, and the confidence on unseen points must match its accuracy.
    x, labels, centres = synthetic(60, 6, 16, noise=1.2)
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(["alpha", "beta", "gamma", "delta"], 4)) for _ in labels]
    clf = ExampleClassifier(labels, x, texts)
    fit(clf, texts, size=300)
    w_emb, w_lex, w_probe = clf.params.weights
    assert max(w_emb, w_probe) > 3 * w_lex and clf.probe is not None
    xt, lt, _ = synthetic(100, 6, 16, noise=1.2, seed=2)
    xt = (np.random.default_rng(2).normal(size=(6, 16)) * 0 + centres)[[int(s[1:]) for s in lt]]
    xt = xt + 1.2 * np.random.default_rng(3).normal(size=xt.shape)
    probs = np.array(
        [clf.probabilities(clf.evidence(v.astype(np.float32), "alpha beta")) for v in xt]
    )
    gold = np.array([clf.names.index(s) for s in lt])
    ok = probs.argmax(1) == gold
    assert 0.3 < ok.mean() < 1.0  # a task with real errors, so calibration is tested
    assert expected_calibration_error(probs.max(1), ok) < 0.1


def test_fit_weights_is_the_maximum_likelihood_temperature() -> None:
    # One view whose evidence is log-probabilities that are too sharp by a factor of 3:
    # the fitted weight brings them back to about 1/3.
    rng = np.random.default_rng(0)
    n, labels = 4000, 4
    true_logits = rng.normal(size=(n, labels))
    p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    y = np.array([rng.choice(labels, p=row) for row in p])
    evidence = (3 * true_logits)[:, None, :]
    (w,) = fit_weights(evidence, y)
    assert w == pytest.approx(1 / 3, rel=0.15)


def test_csv_loading_errors_name_what_to_fix(tmp_path: Path) -> None:
    f = tmp_path / "x.csv"
    with pytest.raises(FailedPrecondition, match="cannot read"):
        load_csv(f, "text", "label")
    f.write_text("text,category\nhello,greet\n")
    with pytest.raises(FailedPrecondition, match=r"no column 'label'.*columns: text, category"):
        load_csv(f, "text", "label")
    f.write_text("text,label\n,\n")
    with pytest.raises(FailedPrecondition, match="no labelled rows"):
        load_csv(f, "text", "label")
    f.write_bytes(b"text,label\n\xff\xfe,x\n")
    with pytest.raises(FailedPrecondition, match="not valid UTF-8"):
        load_csv(f, "text", "label")
    f.write_text("text,label\nhello,greet\nbye,leave\n")
    assert load_csv(f, "text", "label") == ExampleSet(("hello", "bye"), ("greet", "leave"))


def test_example_checks_and_the_cache_key() -> None:
    ex = ExampleSet(("a", "b"), ("x", "y"))
    check(ex, 10)
    with pytest.raises(InvalidRequest, match="at most 1"):
        check(ex, 1)
    with pytest.raises(InvalidRequest, match="2 distinct labels"):
        check(ExampleSet(("a", "b"), ("x", "x")), 10)
    assert ex.digest("v1") != ex.digest("v2")  # a new model version re-embeds
    assert ex.digest("v1") != ExampleSet(("a", "b"), ("x", "z")).digest("v1")
    assert ex.digest("v1") == ExampleSet(("a", "b"), ("x", "y")).digest("v1")


def test_the_cascade_gate_skips_the_model_only_where_it_would_not_help() -> None:
    from dataclasses import replace

    from sidecar.fewshot.fit import choose_gate

    rng = np.random.default_rng(0)
    n, labels = 400, 4
    y = rng.integers(0, labels, n)
    sure = np.arange(n) < n // 2  # the words settle half the rows; the model settles all
    lex = np.full((n, labels), np.log(0.25))
    lex[sure] = np.log(0.02)
    lex[sure, y[sure]] = np.log(0.94)
    wrong = (y + 1) % labels
    lex[~sure, wrong[~sure]] = np.log(0.4)  # unsure and wrong without the model
    probe = np.full((n, labels), np.log(0.05))
    probe[np.arange(n), y] = np.log(0.85)
    ev = np.stack([np.zeros((n, labels)), lex, probe], axis=1)
    clf = ExampleClassifier([f"l{i}" for i in y], np.eye(n, 8, dtype=np.float32), ["x"] * n)
    clf.params = replace(clf.params, weights=(0.0, 1.0, 1.0), lex_alone=1.0)
    gate = choose_gate(clf, ev, y)
    alone = np.exp(lex).max(axis=1) / np.exp(lex).sum(axis=1)
    assert alone[~sure].max() < gate <= alone[sure].min()
