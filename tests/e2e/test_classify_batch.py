"""Classify's one-batch label scoring against the sequential scorer, on the real models.

Both run in the same runner (the same context, the same prompt and prefix cache). On
SmolLM2 (Q4_1) the batch gives every label the very same float and counts the same label
tokens. On Gemma 3 (Q4_K_M) the weights' matmul kernels round differently with the
number of rows in a decode (one by one decodes 1-8 rows, the batch up to 63), so the
scores agree to a tolerance and the label is the same. How far they drift depends on the
CPU's kernels: on Banking77 prompts, up to 0.3 nat on unlikely labels and 0.035 in a
label's probability on an Intel Xeon, 0.28 nat and 0.063 on an AMD EPYC (both AVX-512).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from sidecar.domain.specs import RunnerSpec
from sidecar.domain.types import Classification, ClassifyTask
from sidecar.worker import prompts
from sidecar.worker.labels import Row, log_softmax, normalise, score_sequences
from sidecar.worker.runner import LlamaRunner

pytestmark = pytest.mark.e2e

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import GEMMA3, REPO, SMOLLM2  # noqa: E402

SIX = (
    "lost_or_stolen_card",
    "card_arrival",
    "exchange_rate",
    "top_up_failed",
    "pin_blocked",
    "declined_transfer",
)
ALL77 = REPO.parent / "shared/data/banking77/categories.json"


def texts(n: int) -> list[str]:
    with open(REPO / "tests/data/banking77-mini/test.csv", newline="") as f:
        rows = [row["text"] for row in csv.DictReader(f)]
    return rows[:: max(1, len(rows) // n)][:n]


def banking77_labels() -> tuple[str, ...]:
    if ALL77.is_file():
        return tuple(json.loads(ALL77.read_text()))
    # Without the shared data set: the mini set's own categories.
    with open(REPO / "tests/data/banking77-mini/test.csv", newline="") as f:
        return tuple(dict.fromkeys(row["category"] for row in csv.DictReader(f)))


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def runner(request: pytest.FixtureRequest) -> Iterator[LlamaRunner]:
    path = {"smollm2": SMOLLM2, "gemma3": GEMMA3}[request.param]
    if not path.is_file():
        pytest.fail(f"{path} is missing: ./scripts/test fetches it")
    r = LlamaRunner(RunnerSpec(path=path, context=2048, threads=1, batch=512))
    yield r
    r.close()


class _LlamaPrefixDecoder:
    """PrefixDecoder over the runner's context for the sequential scorer that Classify used
    before (`labels.score_sequences`): decodes label tokens with logits for each."""

    def __init__(self, runner: LlamaRunner) -> None:
        self._r = runner
        self.decoded = 0

    # The context is shared with the batch's sequences: only touch `classify_seq`.
    def truncate(self, n_tokens: int) -> None:
        llm = self._r.llm
        llm.n_tokens = n_tokens
        self._r.batch.clear(self._r.classify_seq, n_tokens)

    def decode(self, tokens: Sequence[int]) -> list[Row]:
        llm = self._r.llm
        llm._batch.set_batch(batch=list(tokens), n_past=llm.n_tokens, logits_all=True)
        for i in range(len(tokens)):
            llm._batch.batch.seq_id[i][0] = self._r.classify_seq
        llm._ctx.decode(llm._batch)
        llm.n_tokens += len(tokens)
        self.decoded += len(tokens)
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(tokens), self._r.n_vocab))
        rows = log_softmax(logits)
        return [rows[i] for i in range(len(tokens))]


def sequential(r: LlamaRunner, task: ClassifyTask) -> tuple[dict[str, float], int]:
    """The scorer Classify used before: one label after another, same prompt path."""
    prompt, prefix = r._task_prompt(prompts.classify_messages(task.text, task.labels, ""))
    seqs = [[*r._tokenize(label, add_bos=False), r._end_of_turn] for label in task.labels]
    try:
        r._eval_prompt(prompt, lambda: False, prefix)
        decoder = _LlamaPrefixDecoder(r)
        logps = score_sequences(decoder, len(prompt), r._last_logprobs(), seqs)
    finally:
        r.batch.clear(r.classify_seq)
    return dict(zip(task.labels, logps, strict=True)), decoder.decoded


def batched(r: LlamaRunner, task: ClassifyTask) -> Classification:
    out = r.run(task, None, lambda: False)
    assert isinstance(out, Classification)
    return out


def assert_same(r: LlamaRunner, task: ClassifyTask, groups: int = 1) -> None:
    want, decoded = sequential(r, task)
    got = batched(r, task)
    scores = {s.label: s.logprob for s in got.scores}
    if r.spec.path == SMOLLM2:
        assert scores == want  # exact, not approximate
    else:
        probs = dict(zip(want, normalise(list(want.values())), strict=True))
        dlogp = max(abs(scores[k] - want[k]) for k in want)
        dp = max(abs(s.probability - probs[s.label]) for s in got.scores)
        assert dlogp < 1.0 and dp < 0.1, (dlogp, dp)
    assert got.label == max(want, key=lambda k: want[k])
    if groups == 1:
        assert got.usage.completion_tokens == decoded
    else:  # each group decodes the prefixes its labels share with other groups again
        assert decoded < got.usage.completion_tokens < decoded + groups * 8


@pytest.mark.parametrize("text", texts(2))
def test_six_labels_score_exactly_as_one_by_one(runner: LlamaRunner, text: str) -> None:
    assert_same(runner, ClassifyTask(text, SIX))


def test_banking77_zero_shot_scores_exactly_as_one_by_one(runner: LlamaRunner) -> None:
    labels = banking77_labels()
    assert_same(runner, ClassifyTask(texts(1)[0], labels))


def test_labels_beyond_the_free_sequence_ids_go_in_groups(runner: LlamaRunner) -> None:
    # More labels than sequence ids left above the prompt's: several decodes, same scores.
    free = llama_cpp.llama_n_seq_max(runner.llm._ctx.ctx) - runner.classify_seq - 1
    labels = tuple(f"label {i}" for i in range(free + 9))
    assert_same(runner, ClassifyTask("my card was stolen", labels), groups=2)


def test_the_cache_holds_no_label_sequence_afterwards(runner: LlamaRunner) -> None:
    batched(runner, ClassifyTask("my card was stolen", SIX))
    mem = llama_cpp.llama_get_memory(runner.llm._ctx.ctx)
    for seq in range(runner.classify_seq, llama_cpp.llama_n_seq_max(runner.llm._ctx.ctx)):
        assert llama_cpp.llama_memory_seq_pos_max(mem, seq) == -1
