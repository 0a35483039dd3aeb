"""BatchDecoder on a tiny random GGUF: sequences join and leave between steps, a cancelled
one frees its slot at once, and a shared prefix is decoded once and copied."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.domain.specs import RunnerSpec
from sidecar.domain.types import Generation, Sampling
from sidecar.worker.runner import LlamaRunner
from sidecar.worker.sequence import Sequence


@pytest.fixture(scope="module")
def runner(tiny_model: Path) -> Iterator[LlamaRunner]:
    r = LlamaRunner(RunnerSpec(tiny_model, 256, 1, 64, parallel=3))
    yield r
    r.close()


def seq(r: LlamaRunner, key: int, tokens: list[int], n: int, prefix: int = 0) -> Sequence:
    return r._generate(key, tokens, n, Sampling(), None, None, prefix=prefix)


def drain(r: LlamaRunner) -> dict[int, object]:
    out: dict[int, object] = {}
    while r.batch.busy:
        for s, outcome in r.batch.step():
            out[s.key] = outcome
    return out


def test_more_requests_than_slots_all_finish_and_free_their_slots(runner: LlamaRunner) -> None:
    for k in range(5):
        runner.batch.add(seq(runner, k, [1, 5 + k, 9, 12], 6))
    out = drain(runner)
    assert sorted(out) == [0, 1, 2, 3, 4]
    assert all(isinstance(g, Generation) and g.usage.completion_tokens <= 6 for g in out.values())
    assert sorted(runner.batch._slots) == [0, 1, 2]


def test_a_cancelled_sequence_leaves_between_steps(runner: LlamaRunner) -> None:
    runner.batch.add(seq(runner, 1, [1, 7, 8], 50))
    runner.batch.add(seq(runner, 2, [1, 3, 4], 4))
    runner.batch.step()
    runner.batch.cancel(1)
    out = drain(runner)
    assert out[1] is None and isinstance(out[2], Generation)
    assert sorted(runner.batch._slots) == [0, 1, 2]


def test_a_shared_prefix_is_decoded_once_and_reused(runner: LlamaRunner) -> None:
    prefix = list(range(1, 41))
    before = runner.prefix_hits
    runner.batch.add(seq(runner, 1, [*prefix, 50, 51], 3, prefix=len(prefix)))
    first = drain(runner)[1]
    runner.batch.add(seq(runner, 2, [*prefix, 50, 51], 3, prefix=len(prefix)))
    second = drain(runner)[2]
    assert runner.prefix_hits == before + 1
    assert isinstance(first, Generation) and isinstance(second, Generation)
    assert first.text == second.text


def test_embed_jobs_that_wait_together_share_decodes_and_keep_their_own_answers(
    tiny_model: Path,
) -> None:
    import multiprocessing as mp

    from sidecar.domain.types import EmbedTask
    from sidecar.worker.process import _Worker

    r = LlamaRunner(RunnerSpec(tiny_model, 256, 1, 64, parallel=4))
    try:
        # Of one length: the embedder decodes texts of equal token counts together.
        texts = [("alpha",), ("gamma",), ("delta",)]
        alone = [r.run_whole(EmbedTask(t), lambda: False) for t in texts]
        decodes = r._embedder.decodes if r._embedder else 0
        daemon, worker = mp.Pipe()
        for i, t in enumerate(texts):
            daemon.send(("run", i, EmbedTask(t), False))
        daemon.send(("run", 9, EmbedTask(("x" * 500,)), False))  # too long: its own error
        daemon.send(("stop",))
        w = _Worker(worker, r)
        w.inbox.extend(worker.recv() for _ in range(len(texts) + 1))
        w._embed_together()
        got = {}
        while daemon.poll():
            m = daemon.recv()
            got[m[1]] = m
        assert got[9][0] == "error" and got[9][2] == "out_of_range"
        for i, one in enumerate(alone):
            assert got[i][0] == "done"
            assert got[i][2].vectors == one.vectors
        assert r._embedder is not None
        assert r._embedder.decodes - decodes == 1  # one decode for the three jobs
    finally:
        r.close()
