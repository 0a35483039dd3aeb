"""A plain greedy request takes the logits' argmax in the batch instead of llama.cpp's greedy
sampler (which copies the whole vocabulary every token): the replies, token by token and
with their log-probabilities, are exactly those of the sampler, on both real models. A
request with a grammar or a repeat penalty still goes through the sampler chain."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.domain.specs import RunnerSpec
from sidecar.domain.types import ExtractTask, GenerateTask, Generation, Sampling
from sidecar.worker import runner as runner_module
from sidecar.worker.runner import LlamaRunner
from sidecar.worker.sequence import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import GEMMA3, SMOLLM2

pytestmark = pytest.mark.e2e

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a village by the sea, there lived",
    "def fibonacci(n):",
)


class ThroughSampler(Sequence):
    """A sequence that always samples through llama.cpp's sampler chain."""

    @property  # type: ignore[override]
    def argmax(self) -> bool:
        return False

    @argmax.setter
    def argmax(self, _value: bool) -> None:
        pass


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def runner(request: pytest.FixtureRequest) -> Iterator[LlamaRunner]:
    path = {"smollm2": SMOLLM2, "gemma3": GEMMA3}[request.param]
    if not path.is_file():
        pytest.fail(f"{path} is missing: ./scripts/test fetches it")
    r = LlamaRunner(RunnerSpec(path=path, context=1024, threads=1, batch=512))
    yield r
    r.close()


def generate(r: LlamaRunner, task: GenerateTask) -> Generation:
    out = r.run(task, None, lambda: False)
    assert isinstance(out, Generation)
    return out


def test_greedy_replies_and_logprobs_are_the_samplers(
    runner: LlamaRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    tasks = [GenerateTask(p, max_tokens=32, logprobs=True, top_logprobs=2) for p in PROMPTS]
    fast = [generate(runner, t) for t in tasks]
    monkeypatch.setattr(runner_module, "Sequence", ThroughSampler)
    slow = [generate(runner, t) for t in tasks]
    for a, b in zip(fast, slow, strict=True):
        assert a.text == b.text and a.usage == b.usage
        assert [(t.token, t.logprob, t.top) for t in a.logprobs] == [
            (t.token, t.logprob, t.top) for t in b.logprobs
        ]
        assert a.usage.completion_tokens > 0


def test_only_a_plain_greedy_request_skips_the_sampler(
    runner: LlamaRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Sequence] = []
    real = runner_module.Sequence

    def spy(*args: object, **kwargs: object) -> Sequence:
        seq = real(*args, **kwargs)  # type: ignore[arg-type]
        made.append(seq)
        return seq

    monkeypatch.setattr(runner_module, "Sequence", spy)
    schema = json.dumps({"type": "object", "properties": {"name": {"type": "string"}}})
    generate(runner, GenerateTask(PROMPTS[0], max_tokens=4))
    generate(runner, GenerateTask(PROMPTS[0], 4, Sampling(repeat_penalty=1.3)))
    generate(runner, GenerateTask(PROMPTS[0], 4, Sampling(temperature=0.7, seed=1)))
    runner.run(ExtractTask("John is 42.", schema, max_tokens=16), None, lambda: False)
    assert [s.argmax for s in made] == [True, False, False, False]
