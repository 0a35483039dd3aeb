"""Embedding in batches (sidecar/worker/embed.py) on a tiny random model: a text's vector
is the same alone or beside any others, several jobs share decodes, errors stay per job."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from sidecar.domain.errors import OutOfRange
from sidecar.domain.specs import RunnerSpec
from sidecar.domain.types import Embeddings, EmbedTask
from sidecar.worker.embed import STREAMS, BatchEmbedder

TEXTS = ["a cat", "the dog sat on the mat", "x", "hello there, world", "zz top", "q" * 40]


@pytest.fixture(scope="module")
def embedder(tiny_model: Path) -> object:
    model = llama_cpp.Llama(model_path=str(tiny_model), n_ctx=64, verbose=False)
    e = BatchEmbedder(model._model, RunnerSpec(tiny_model, context=256, threads=1, batch=64))
    yield e
    e.close()
    model.close()


def vectors(r: Embeddings | OutOfRange) -> np.ndarray:
    assert isinstance(r, Embeddings)
    return np.asarray(r.vectors)


def test_a_text_embeds_the_same_alone_and_beside_others(embedder: BatchEmbedder) -> None:
    alone = [vectors(embedder.embed_many([EmbedTask((t,))])[0])[0] for t in TEXTS]
    together = vectors(embedder.embed_many([EmbedTask(tuple(TEXTS))])[0])
    reversed_ = vectors(embedder.embed_many([EmbedTask(tuple(TEXTS[::-1]))])[0])[::-1]
    assert np.array_equal(np.asarray(alone), together)
    assert np.array_equal(together, reversed_)


def test_several_jobs_share_decodes_and_get_their_own_vectors(embedder: BatchEmbedder) -> None:
    jobs = [EmbedTask((t,), normalize=True) for t in ("abcd", "efgh", "ijkl", "mnop")]
    before = embedder.decodes
    results = embedder.embed_many(jobs)
    assert embedder.decodes - before == 1  # four texts of one length: one decode
    for job, r in zip(jobs, results, strict=True):
        (alone,) = vectors(embedder.embed_many([job])[0])
        assert np.array_equal(vectors(r)[0], alone)
        assert abs(np.linalg.norm(alone) - 1) < 1e-9
        assert isinstance(r, Embeddings) and r.usage.prompt_tokens == len(
            embedder.tokens(job.texts[0])
        )


def test_texts_are_packed_by_streams_and_batch_tokens(embedder: BatchEmbedder) -> None:
    before = embedder.decodes
    embedder.means([[1, 2, 3]] * (STREAMS + 1))
    assert embedder.decodes - before == 2
    before = embedder.decodes
    embedder.means([[1] * 40, [1] * 40])  # 80 tokens > batch 64: two decodes
    assert embedder.decodes - before == 2
    before, padded = embedder.decodes, embedder.padding
    embedder.means([[1, 2], [1, 2, 3], [4, 5]])  # the short ones padded to 3 tokens
    assert (embedder.decodes - before, embedder.padding - padded) == (1, 2)


def test_a_text_padded_to_its_neighbours_length_embeds_as_alone(embedder: BatchEmbedder) -> None:
    texts = [embedder.tokens(t) for t in ("x", "a cat", "hello there, world")]
    alone = np.vstack([embedder.means([t]) for t in texts])
    before = embedder.decodes
    together = embedder.means(texts)
    assert embedder.decodes - before == 1
    assert np.array_equal(alone, together)


def test_a_too_long_text_fails_its_own_job_only(embedder: BatchEmbedder) -> None:
    ok, bad = EmbedTask(("fine",)), EmbedTask(("short", "y" * 200))
    r_ok, r_bad = embedder.embed_many([ok, bad])
    assert isinstance(r_bad, OutOfRange)
    assert "texts[1] is" in r_bad.message and "at most 64" in r_bad.message
    assert np.array_equal(vectors(r_ok), vectors(embedder.embed_many([ok])[0]))


def test_vectors_match_llama_embed_of_one_text(tiny_model: Path, embedder: BatchEmbedder) -> None:
    old = llama_cpp.Llama(
        model_path=str(tiny_model),
        n_ctx=256,
        n_batch=64,
        n_ubatch=64,
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        verbose=False,
    )
    try:
        for t in TEXTS[:3]:
            want = np.asarray(old.embed([t], normalize=True)[0])
            got = vectors(embedder.embed_many([EmbedTask((t,), normalize=True)])[0])[0]
            assert np.abs(want - got).max() < 1e-6
    finally:
        old.close()
