"""The batch's KV cells on a tiny random GGUF: a finished or cancelled neighbour's cells are
never freed under a running sequence (its logits stay those it has alone), admission waits
while the worst case does not fit, the cache drains when idle, and a whole job that does
not fit beside the running sequences waits for them and then runs."""

from __future__ import annotations

import multiprocessing as mp
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import pytest
from tiny_gguf import write_tiny_llama

from sidecar.domain.errors import FailedPrecondition
from sidecar.domain.specs import RunnerSpec, kv_cache_type
from sidecar.domain.types import Classification, ClassifyTask, Generation, Sampling
from sidecar.engine.swap import footprint, head_widths
from sidecar.gguf_check import check as check_gguf
from sidecar.worker.batch import NeedsRoom
from sidecar.worker.process import _Worker
from sidecar.worker.runner import LlamaRunner
from sidecar.worker.sequence import Sequence

LONG = [1, *range(20, 60)]  # a prompt, then greedy tokens of the random model


@pytest.fixture(scope="module")
def wide_heads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose heads are 32 wide: a q8_0 cache needs a multiple of 32."""
    return write_tiny_llama(tmp_path_factory.mktemp("m") / "wide.gguf", seed=3, n_head=2)


@pytest.fixture
def runner(tiny_model: Path) -> Iterator[LlamaRunner]:
    r = LlamaRunner(RunnerSpec(tiny_model, 256, 1, 64, parallel=3))
    yield r
    r.close()


def seq(r: LlamaRunner, key: int, tokens: list[int], n: int) -> Sequence:
    return r._generate(key, tokens, n, Sampling(), None, None)


def run(r: LlamaRunner, *seqs: Sequence, cancel_after: dict[int, int] | None = None) -> None:
    for s in seqs:
        r.batch.add(s)
    steps = 0
    while r.batch.busy:
        r.batch.step()
        steps += 1
        for key, at in (cancel_after or {}).items():
            if steps == at:
                r.batch.cancel(key)


@pytest.mark.parametrize("kv", ["f16", "q8_0"])
@pytest.mark.parametrize("leaves", ["finishes", "is cancelled"])
def test_a_neighbour_leaving_below_a_running_sequence_leaves_its_logits_as_alone(
    wide_heads: Path, leaves: str, kv: str
) -> None:
    runner = LlamaRunner(RunnerSpec(wide_heads, 256, 1, 64, parallel=3, kv_cache=kv))
    try:
        _neighbour_leaves(runner, leaves)
    finally:
        runner.close()


def _neighbour_leaves(runner: LlamaRunner, leaves: str) -> None:
    alone = seq(runner, 1, LONG, 60)
    run(runner, alone)
    runner.batch._drain()
    # The neighbour is admitted first, so its cells lie below the long sequence's; once it
    # leaves, llama.cpp would put the long sequence's next tokens in them if they were freed.
    neighbour = seq(runner, 2, [1, 7, 8, 9] * 20, 4 if leaves == "finishes" else 150)
    beside = seq(runner, 1, LONG, 60)
    run(runner, neighbour, beside, cancel_after={2: 3} if leaves == "is cancelled" else None)
    assert len(beside.logprobs) == len(alone.logprobs) == 60
    assert beside.logprobs == alone.logprobs  # bit for bit
    assert beside.text.text == alone.text.text


def test_cells_are_not_freed_while_a_neighbour_runs(runner: LlamaRunner) -> None:
    cells = runner.batch.cells
    run(runner, seq(runner, 1, [1, 5, 6], 5), seq(runner, 2, [1, 5, 6], 30))
    # The prompts, then each generated token but the last; the first one's cells stay taken
    # (by the garbage id) while the second runs on.
    assert cells.used == cells.high == 3 + 4 + 3 + 29


def test_an_idle_cache_that_keeps_nothing_is_emptied_before_the_next_sequence(
    runner: LlamaRunner,
) -> None:
    cells = runner.batch.cells
    run(runner, seq(runner, 1, LONG, 20))
    assert cells.used == cells.high == len(LONG) + 19
    drains = cells.drains
    run(runner, seq(runner, 2, LONG, 20))
    assert (cells.used, cells.high, cells.drains) == (len(LONG) + 19,) * 2 + (drains + 1,)


def test_an_idle_cache_that_keeps_a_prefix_drains_once_past_half_full(
    runner: LlamaRunner,
) -> None:
    cells = runner.batch.cells
    drains = cells.drains
    while cells.used <= cells.size // 2:
        run(runner, runner._generate(3, LONG, 60, Sampling(), None, None, prefix=5))
    assert cells.drains == drains  # the shared prefix is worth keeping
    runner.batch.step()  # idle, past half full: emptied
    assert (cells.used, cells.high, cells.drains) == (0, 0, drains + 1)


def test_with_one_slot_cells_are_freed_as_llama_cpp_frees_them(tiny_model: Path) -> None:
    r = LlamaRunner(RunnerSpec(tiny_model, 256, 1, 64, parallel=1))
    try:
        mem = llama_cpp.llama_get_memory(r.batch.ctx.ctx)
        for key in (1, 2):
            run(r, seq(r, key, LONG, 20))
            assert r.batch.cells.used == 0
            assert r.batch.cells.high == len(LONG) + 19  # emptied before each
            assert llama_cpp.llama_memory_seq_pos_max(mem, r.batch.cells.garbage) == -1
    finally:
        r.close()


def test_a_sequence_whose_worst_case_does_not_fit_waits_for_the_batch_to_drain(
    runner: LlamaRunner,
) -> None:
    cells = runner.batch.cells
    size = cells.size
    a = seq(runner, 1, LONG, 200)
    b = seq(runner, 2, LONG, 200)
    runner.batch.add(a)
    runner.batch.add(b)
    runner.batch.step()
    assert len(runner.batch.active) == 2
    cells.take(size - cells.used - 2 * (len(LONG) + 200) + len(LONG) + 1)  # as if garbage
    c = seq(runner, 3, LONG, 200)  # a third slot is free, but not the cells: it waits
    runner.batch.add(c)
    runner.batch.step()
    assert c not in runner.batch.active and c.seq == -1
    drains = cells.drains
    run(runner)
    assert cells.drains == drains + 1  # admitted after the two finished, on an empty cache
    assert all(len(s.logprobs) == 200 for s in (a, b, c))
    alone = seq(runner, 4, LONG, 200)
    runner.batch._drain()
    run(runner, alone)
    assert c.logprobs == alone.logprobs


def test_a_whole_job_that_does_not_fit_beside_running_sequences_waits_then_runs(
    runner: LlamaRunner,
) -> None:
    task = ClassifyTask("what a lovely day", ("happy", "sad", "neutral"))
    alone = runner.run_whole(task, lambda: False)
    assert isinstance(alone, Classification)
    runner.batch._drain()
    long = seq(runner, 1, LONG, 150)
    runner.batch.add(long)
    runner.batch.step()
    cells = runner.batch.cells
    cells.take(cells.size - cells.used - (len(LONG) + 150))  # nothing left beside it
    with pytest.raises(NeedsRoom):
        runner.run_whole(task, lambda: False)

    daemon, pipe = mp.Pipe()
    for msg in (("run", 7, task, False), ("run", 8, task, False), ("cancel", 8)):
        daemon.send(msg)
    worker = _Worker(pipe, runner)
    thread = threading.Thread(target=worker.serve)
    thread.start()
    order: list[tuple[Any, ...]] = []
    while len(order) < 3:
        m = daemon.recv()
        if m[0] in ("done", "error"):
            order.append(m)
    daemon.send(("stop",))
    thread.join(timeout=30)
    got = {m[1]: m for m in order}
    # The batch ran on, admitting nothing; once it was empty the job ran, on a drained cache.
    assert [m[1] for m in order if m[1] != 8] == [1, 7]
    assert isinstance(got[1][2], Generation) and len(long.logprobs) == 150
    assert got[7][0] == "done" and got[7][2].scores == alone.scores
    assert got[8][:3] == ("error", 8, "cancelled")
    assert not runner.batch.hold


def test_the_memory_footprint_counts_the_cache_type_auto_resolves_to(
    wide_heads: Path, tiny_model: Path
) -> None:
    wide, narrow = check_gguf(wide_heads), check_gguf(tiny_model)
    assert head_widths(wide) == (32, 32) and head_widths(narrow) == (16, 16)
    weights = wide.file_size
    # 2 layers x 2 kv heads x (32 + 32) elements per cell, at 2 or 34/32 bytes each
    assert footprint(wide, 1024, 1, "f16") == weights + 1024 * 2 * 2 * 64 * 2
    assert footprint(wide, 1024, 1, "q8_0") == weights + 1024 * 2 * 2 * 64 * 34 // 32
    assert footprint(wide, 1024, 1, "auto") == footprint(wide, 1024, 1, "q8_0")
    assert footprint(narrow, 1024, 1, "auto") == footprint(narrow, 1024, 1, "f16")


def test_auto_takes_q8_0_where_the_heads_hold_its_blocks_and_f16_elsewhere(
    wide_heads: Path, tiny_model: Path
) -> None:
    assert kv_cache_type("auto", (64, 64)) == "q8_0"
    assert kv_cache_type("auto", (256, 128)) == "q8_0"
    assert kv_cache_type("auto", (48, 64)) == "f16"
    assert kv_cache_type("f16", (64, 64)) == "f16"
    for path, kind in [(wide_heads, "q8_0"), (tiny_model, "f16")]:
        r = LlamaRunner(RunnerSpec(path, 256, 1, 64, parallel=2, kv_cache="auto"))
        try:
            assert r.batch.kv_cache == kind
            run(r, seq(r, 1, LONG, 4))
        finally:
            r.close()


def test_a_model_whose_heads_a_q8_0_cache_cannot_hold_is_refused_with_the_fix(
    tiny_model: Path,
) -> None:
    with pytest.raises(FailedPrecondition, match='kv_cache = "f16"'):
        LlamaRunner(RunnerSpec(tiny_model, 256, 1, 64, kv_cache="q8_0"))  # heads 16 wide


@pytest.mark.parametrize(("kv", "beyond"), [("f16", 1), ("q8_0", 2)])
def test_one_token_steps_take_the_idle_cores_until_they_would_attend_over_512_cells(
    wide_heads: Path, kv: str, beyond: int
) -> None:
    """ggml splits a one-row f16 attention over 512+ cells between its threads (rounding
    differently for each count): llama.cpp attends over the highest cell + 1, padded to
    256, so once a 257th cell is taken one-token steps of an f16 cache go back to one."""
    r = LlamaRunner(RunnerSpec(wide_heads, 1024, 2, 64, parallel=1, kv_cache=kv))
    try:
        r.batch.governor.threads = lambda: 2  # type: ignore[method-assign]  # both cores idle
        r.batch.add(seq(r, 1, LONG, 300))
        seen: dict[int, int] = {}
        while r.batch.busy:
            high = r.batch.cells.high
            r.batch.step()
            if r.batch.cells.high == high + 1:  # a one-token step
                seen[high] = r.batch._threads
        assert {t for h, t in seen.items() if h + 1 <= 256} == {2}
        assert {t for h, t in seen.items() if h + 1 > 256} == {beyond}
    finally:
        r.close()
