"""One generation request inside a batch: its prompt, its sampler, and what it has made.

The batch (`batch.BatchDecoder`) decides when a sequence's tokens are decoded; this
module decides what a sampled token means for the reply: the end marker, the text and
its stop sequences, log-probabilities, the streamed events and the final `Generation`.
It is the body of the old one-request decode loop, cut at the decode call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import llama_cpp
from llama_cpp import _internals as internals

from sidecar.domain.types import (
    AdapterFile,
    Generation,
    Result,
    TokenConfidence,
    TokenEvent,
    TopLogprob,
    Usage,
)
from sidecar.worker.labels import Row
from sidecar.worker.logprobs import LogprobTrail, top_k
from sidecar.worker.text import TextAssembler

Emit = Callable[[TokenEvent], None]
Detokenize = Callable[[int], bytes]


@dataclass(eq=False)
class Sequence:
    """A request admitted to the batch. `prefix`: how many leading prompt tokens are a
    task's fixed instructions (decoded as blocks of their own, shared between requests)."""

    key: int  # the job id
    prompt: list[int]
    prefix: int
    limit: int  # tokens it may generate
    sampler: internals.LlamaSampler
    emit: Emit | None
    top: int | None  # None = no per-token log-probabilities; k = them, with k alternatives
    stop: tuple[str, ...] = ()
    # Turns the finished Generation into the job's result (Extract checks its JSON there).
    finish: Callable[[Generation], Result] = lambda g: g
    started: float = field(default_factory=time.perf_counter)
    # Filled in by the batch:
    seq: int = -1  # the llama.cpp sequence id while it holds a slot
    fed: int = 0  # tokens of the prompt (then of the reply) in the KV cache
    next_token: int | None = None  # sampled, to be decoded in the next step
    cancelled: bool = False
    deadline: float | None = None  # time.monotonic() after which it is stopped
    lora: AdapterFile | None = None  # the adapter its every decode step applies
    # The sampler is greedy alone (no grammar, no penalties): the batch takes the raw
    # logits' argmax itself, the same token (the first of equal maxima, as llama.cpp's
    # greedy sampler), without the chain's per-token copy of the whole vocabulary.
    argmax: bool = False

    def __post_init__(self) -> None:
        self.text = TextAssembler(self.stop)
        self.logprobs: list[float] = []
        self.trail = LogprobTrail() if self.top is not None else None
        self.first_ms = 0.0
        self.stopped = False  # finished by the end marker or a stop sequence

    @property
    def prompt_done(self) -> bool:
        return self.fed >= len(self.prompt)

    def chunk(self, batch: int) -> list[int]:
        """The next prompt block: `batch` tokens at most, never across the prefix's end,
        so the blocks are the same whether the request runs alone or beside others."""
        end = self.prefix if self.fed < self.prefix else len(self.prompt)
        return self.prompt[self.fed : min(end, self.fed + batch)]

    def accept(
        self, token: int, logprob: float, row: Row | None, vocab: object, detokenize: Detokenize
    ) -> bool:
        """Take a sampled token and its raw log-probability (and the whole row, which
        alternatives need: with `top`); True when the reply is done."""
        if not self.logprobs:
            self.first_ms = (time.perf_counter() - self.started) * 1000
        # The raw model distribution: the sampler works on a copy of the logits, so this
        # is before penalties, temperature and any grammar mask.
        self.logprobs.append(logprob)
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            self.logprobs.pop()  # the end marker is not part of the answer
            self.stopped = True
            return True
        data = detokenize(token)
        piece = self.text.feed(data)
        if self.trail is not None:
            alternatives: tuple[TopLogprob, ...] = ()
            if self.top and row is not None:
                alternatives = _alternatives(row, self.top, detokenize)
            self.trail.add(data, self.logprobs[-1], alternatives, len(self.text.text))
        if piece and self.emit is not None:
            released = self.trail.released(self.text.text, self.text.released) if self.trail else ()
            self.emit(TokenEvent(piece, released))
        if self.text.stopped:
            self.stopped = True
            return True
        if len(self.logprobs) >= self.limit:
            return True
        self.next_token = token
        return False

    def result(self) -> Result:
        tail = self.text.finish()
        trail = self.trail
        rest = trail.rest(self.text.text) if trail is not None else ()
        if (tail or rest) and self.emit is not None:
            self.emit(TokenEvent(tail, rest))
        ended_by_marker = self.stopped and not self.text.stopped
        gen = Generation(
            text=self.text.text,
            finish_reason="stop" if self.stopped else "length",
            usage=Usage(len(self.prompt), len(self.logprobs) + (1 if ended_by_marker else 0)),
            confidence=TokenConfidence.of(self.logprobs),
            logprobs=trail.all(self.text.text) if trail is not None else (),
        )
        gen.timings.first_token_ms = self.first_ms
        return self.finish(gen)


def _alternatives(row: Row, k: int, detokenize: Detokenize) -> tuple[TopLogprob, ...]:
    out = []
    for token, logprob in top_k(row, k):
        data = detokenize(token)
        out.append(TopLogprob(data.decode("utf-8", errors="replace"), data, logprob))
    return tuple(out)
