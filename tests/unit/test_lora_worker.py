"""LoRA adapters in a worker's batch, on tiny f32 models and real llama.cpp.

Correctness: base + adapter at scale 1 gives the log-probabilities of a model file whose
weights were merged in numpy (W + alpha/rank * B @ A). Isolation: sequences of different
adapters never share a decode step, so each reply equals the one it gets alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sidecar.domain.errors import FailedPrecondition
from sidecar.domain.specs import RunnerSpec
from sidecar.domain.types import AdapterFile, GenerateTask, Generation, Sampling
from sidecar.worker.runner import LlamaRunner
from tests.tiny_gguf import write_tiny_llama
from tests.tiny_lora import merged, write_lora

PROMPT = [256, 72, 101, 108, 108, 111, 32, 119]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("lora")
    base = write_tiny_llama(d / "base.gguf", seed=3)
    return {
        "base": base,
        "a": write_lora(d / "a.gguf", base, seed=1, std=0.3),
        "b": write_lora(d / "b.gguf", base, seed=2, std=0.3, rank=8, alpha=4.0),
        "merged_a": write_tiny_llama(d / "merged.gguf", seed=3, adjust=merged(seed=1, std=0.3)),
    }


def _runner(path: Path, parallel: int = 1) -> LlamaRunner:
    return LlamaRunner(RunnerSpec(path, 256, 1, 64, parallel=parallel))


@pytest.fixture(scope="module")
def runner(files: dict[str, Path]) -> Iterator[LlamaRunner]:
    r = _runner(files["base"], parallel=3)
    yield r
    r.close()


def adapter(files: dict[str, Path], key: str) -> AdapterFile:
    return AdapterFile(key, f"{ord(key):064x}", files[key])


def first_logprobs(r: LlamaRunner, lora: AdapterFile | None) -> np.ndarray:
    s = r._generate(1, PROMPT, 1, Sampling(), None, None, top=1)
    s.lora = lora
    r.batch.add(s)
    rows: list[np.ndarray] = []
    original = r.batch._sample

    def keep(seq, i):  # type: ignore[no-untyped-def]
        ptr = r.batch.ctx.get_logits_ith(i)
        rows.append(np.ctypeslib.as_array(ptr, shape=(r.n_vocab,)).copy())
        return original(seq, i)

    r.batch._sample = keep  # type: ignore[method-assign]
    try:
        while r.batch.busy:
            r.batch.step()
    finally:
        del r.batch._sample
    z = rows[0].astype(np.float64)
    return z - np.log(np.exp(z - z.max()).sum()) - z.max()


def test_adapter_at_scale_1_equals_the_merged_weights(
    files: dict[str, Path], runner: LlamaRunner
) -> None:
    with_adapter = first_logprobs(runner, adapter(files, "a"))
    bare = first_logprobs(runner, None)
    m = _runner(files["merged_a"])
    try:
        merged_lp = first_logprobs(m, None)
    finally:
        m.close()
    assert np.abs(with_adapter - bare).max() > 0.05  # the adapter changes the model
    np.testing.assert_allclose(with_adapter, merged_lp, atol=2e-3)


def generate(r: LlamaRunner, jobs: list[tuple[int, AdapterFile | None]]) -> dict[int, str]:
    for key, lora in jobs:
        s = r.sequence(key, GenerateTask("Hello w", 12, lora=lora), None)
        assert s is not None
        r.batch.add(s)
    out: dict[int, str] = {}
    mixed = []
    original = r.batch._decode

    def watch() -> None:
        mixed.append({(s.lora.sha256 if s.lora else None) for s in r.batch.active})
        original()

    r.batch._decode = watch  # type: ignore[method-assign]
    try:
        while r.batch.busy:
            for s, outcome in r.batch.step():
                assert isinstance(outcome, Generation), outcome
                out[s.key] = outcome.text
    finally:
        del r.batch._decode
    assert all(len(m) == 1 for m in mixed), "one decode step mixed adapters"
    return out


def test_interleaved_adapters_each_reply_as_alone(
    files: dict[str, Path], runner: LlamaRunner
) -> None:
    a, b = adapter(files, "a"), adapter(files, "b")
    alone = {k: generate(runner, [(k, f)])[k] for k, f in ((1, a), (2, b), (3, None))}
    assert len(set(alone.values())) == 3  # three different models
    together = generate(runner, [(1, a), (2, b), (3, None), (4, a), (5, b), (6, None)])
    assert together == {**alone, 4: alone[1], 5: alone[2], 6: alone[3]}


def test_an_adapter_llama_cpp_refuses_fails_only_its_request(
    files: dict[str, Path], runner: LlamaRunner, tmp_path: Path
) -> None:
    other = write_tiny_llama(tmp_path / "other.gguf", n_embd=32, n_head=2)
    bad = AdapterFile("bad", "f" * 64, write_lora(tmp_path / "bad.gguf", other))
    s = runner.sequence(9, GenerateTask("Hi", 2, lora=bad), None)
    assert s is not None
    runner.batch.add(s)
    out = runner.batch.step()
    assert isinstance(out[0][1], FailedPrecondition)
    assert generate(runner, [(10, None)])[10]


def test_a_request_for_another_adapter_is_not_overtaken_by_later_ones(
    files: dict[str, Path], runner: LlamaRunner
) -> None:
    """The batch admits in the order the daemon's fair queue dispatched: a request of the
    running adapter that arrived after one of another adapter waits behind it."""
    a, b = adapter(files, "a"), adapter(files, "b")
    for key, lora in ((1, a), (2, b), (3, a), (4, None)):
        s = runner.sequence(key, GenerateTask("Hello w", 6, lora=lora), None)
        assert s is not None
        runner.batch.add(s)
    started: list[int] = []
    while runner.batch.busy:
        runner.batch.step()
        started += [s.key for s in runner.batch.active if s.key not in started]
    assert started == [1, 2, 3, 4]


def test_a_flood_of_one_adapter_delays_another_only_until_earlier_ones_end(
    files: dict[str, Path], runner: LlamaRunner
) -> None:
    """Under continuous load of adapter a (a new request every step), a request of b waits
    only for the a requests that came before it: none that came after starts before it,
    so however long the flood lasts, b starts within those requests' tokens."""
    a, b = adapter(files, "a"), adapter(files, "b")
    key = 100

    def add(lora: AdapterFile) -> int:
        nonlocal key
        key += 1
        s = runner.sequence(key, GenerateTask("Hello w", 6, lora=lora), None)
        assert s is not None
        runner.batch.add(s)
        return key

    waiting_b, started = 0, []
    for step in range(60):
        if step == 3:
            waiting_b = add(b)
        else:
            add(a)  # the flood goes on before, while and after b waits
        runner.batch.step()
        started += [s.key for s in runner.batch.active if s.key not in started]
        if waiting_b in started:
            assert all(s.lora == b for s in runner.batch.active)  # never mixed
            break
    assert waiting_b in started, "b starved behind a"
    assert started[: started.index(waiting_b)] == list(range(101, waiting_b))
    # 3 earlier a requests of 6 tokens, 3 at a time: b starts within a few rounds.
    assert step - 3 <= 2 * 7
    for s in list(runner.batch.waiting):
        runner.batch.cancel(s.key)
    while runner.batch.busy:
        runner.batch.step()
