"""LlamaRunner: everything that touches llama.cpp, for one model, in one thread.

It owns its `Llama` objects and frees them deterministically in `close()`. It runs
in a worker process (the normal case) or in a thread of the daemon (the in-process
engine, for debugging); never on an event loop.

Every request starts from an empty KV cache: replies then depend only on the
request and the model file, which is what makes greedy decoding byte-identical
across requests, workers and restarts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import json_schema_to_gbnf

from sidecar.domain.errors import (
    ContextOverflow,
    FailedPrecondition,
    InternalError,
    InvalidRequest,
    OutOfRange,
    SchemaViolation,
)
from sidecar.domain.specs import ModelFacts, RunnerSpec
from sidecar.domain.types import (
    ChatMessage,
    ChatTask,
    Classification,
    ClassifyTask,
    Embeddings,
    EmbedTask,
    Extraction,
    ExtractTask,
    GenerateTask,
    Generation,
    LabelScore,
    Result,
    Sampling,
    Task,
    TokenConfidence,
    TokenEvent,
    TopLogprob,
    Usage,
)
from sidecar.schema_limits import MAX_GRAMMAR_BYTES, bounded_schema, converter_refusal
from sidecar.validate import conforming_json
from sidecar.worker import prompts
from sidecar.worker.labels import Row, common_prefix, log_softmax, normalise, score_sequences
from sidecar.worker.logprobs import LogprobTrail, top_k
from sidecar.worker.specials import SpecialTokens
from sidecar.worker.text import TextAssembler

Emit = Callable[[TokenEvent], None]

# llama-cpp-python's converter lets raw control characters into JSON strings, which
# strict JSON parsers reject; llama.cpp's own converter excludes them, so do the same.
_LOOSE_CHAR = 'char ::= [^"\\\\]'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F]'

ShouldStop = Callable[[], bool]


class Stopped(Exception):
    """The caller cancelled or its deadline passed; the worker is free again."""


class LlamaRunner:
    def __init__(self, spec: RunnerSpec) -> None:
        self.spec = spec
        self._stack = ExitStack()
        try:
            self.llm = self._open(embedding=False)
        except ValueError as e:  # llama-cpp-python's way of saying the file did not load
            self._stack.close()
            raise FailedPrecondition(f"cannot load model {spec.path}: {e}") from None
        self._embedder: llama_cpp.Llama | None = None
        self._specials: SpecialTokens | None = None
        self._cached_prefix: list[int] = []  # tokens whose KV the context holds as a block
        self.prefix_hits = 0
        # Per instruction set: the prompt tokens that come before the user's text.
        self._fixed: dict[tuple[ChatMessage, ...], list[int]] = {}
        self._vocab = self.llm._model.vocab
        self.n_vocab = self.llm.n_vocab()
        eot = llama_cpp.llama_vocab_eot(self._vocab)
        self._end_of_turn = eot if eot >= 0 else self.llm.token_eos()
        template = self.llm.metadata.get("tokenizer.chat_template")
        self._formatter = self._make_formatter(template) if template else None
        self.facts = ModelFacts(
            # llama.cpp may round the context up; llama-cpp-python's buffers keep the asked size.
            n_ctx=min(self.llm.n_ctx(), spec.context),
            n_vocab=self.n_vocab,
            n_embd=self.llm.n_embd(),
            chat_template=self._formatter is not None,
        )

    def _open(self, *, embedding: bool) -> llama_cpp.Llama:
        s = self.spec
        extra: dict[str, Any] = {}
        if embedding:
            extra = {"embedding": True, "pooling_type": llama_cpp.LLAMA_POOLING_TYPE_MEAN}
        llm = llama_cpp.Llama(
            model_path=str(s.path),
            n_ctx=s.context,
            n_batch=s.batch,
            n_ubatch=s.batch,
            n_threads=s.threads,
            n_threads_batch=s.threads,
            seed=0,
            verbose=False,
            **extra,
        )
        self._stack.callback(llm.close)
        return llm

    def close(self) -> None:
        self._stack.close()

    # ------------------------------------------------------------------ dispatch

    def run(self, task: Task, emit: Emit | None, should_stop: ShouldStop) -> Result:
        if isinstance(task, GenerateTask | ChatTask):
            if isinstance(task, GenerateTask):
                tokens = self._tokenize(task.prompt, add_bos=True)
            else:
                tokens = self._chat_tokens(task.messages)
            top = task.top_logprobs if task.logprobs else None
            return self._generate(
                tokens, task.max_tokens, task.sampling, None, emit, should_stop, top=top
            )
        if isinstance(task, ClassifyTask):
            return self._classify(task, should_stop)
        if isinstance(task, ExtractTask):
            return self._extract(task, should_stop)
        if isinstance(task, EmbedTask):
            return self._embed(task)
        raise InternalError(f"unknown task {type(task).__name__}")

    # ------------------------------------------------------------------ tokens

    def _tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        if self._specials is None:  # ~0.05-0.2 s over the vocabulary, once per worker
            self._specials = SpecialTokens.of_model(self.llm)
        return self._specials.tokenize(text, self._llama_tokenize, add_bos=add_bos)

    def _llama_tokenize(self, text: bytes, add_bos: bool, special: bool) -> list[int]:
        return list(self.llm.tokenize(text, add_bos=add_bos, special=special))

    def _make_formatter(self, template: str) -> Jinja2ChatFormatter | None:
        def text_of(token: int) -> str:
            return "" if token < 0 else str(self.llm._model.token_get_text(token))

        try:
            return Jinja2ChatFormatter(
                template=template,
                eos_token=text_of(self.llm.token_eos()),
                bos_token=text_of(self.llm.token_bos()),
            )
        except Exception:  # a template jinja cannot compile: fall back to ChatML
            return None

    def _chat_tokens(self, messages: tuple[ChatMessage, ...]) -> list[int]:
        if self._formatter is None:
            return self._tokenize(prompts.chatml(messages), add_bos=True)
        try:
            rendered = self._formatter(
                messages=[{"role": m.role, "content": m.content} for m in messages]  # type: ignore[misc]
            )
        except Exception as e:  # templates raise on e.g. roles they do not know
            raise InvalidRequest(f"the model's chat template rejected the messages: {e}") from None
        return self._tokenize(rendered.prompt, add_bos=not rendered.added_special)

    def _check_fits(self, prompt_len: int, max_tokens: int | None) -> int:
        n_ctx = self.facts.n_ctx
        if prompt_len >= n_ctx:
            raise ContextOverflow(
                f"the prompt is {prompt_len} tokens but the context window is {n_ctx}: "
                "shorten the prompt (or raise the model's `context` setting)"
            )
        room = n_ctx - prompt_len
        if max_tokens is None:
            return min(self.spec.default_max_tokens, room)
        if max_tokens > room:
            raise ContextOverflow(
                f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the "
                f"context window of {n_ctx}: set max_tokens to at most {room}"
            )
        return max_tokens

    # ------------------------------------------------------------------ decoding

    def _sampler(self, s: Sampling, grammar: str | None) -> internals.LlamaSampler:
        sampler = internals.LlamaSampler()
        if s.repeat_penalty not in (0.0, 1.0):
            sampler.add_penalties(
                n_vocab=self.n_vocab,
                penalty_last_n=64,
                penalty_repeat=s.repeat_penalty,
                penalty_freq=0.0,
                penalty_present=0.0,
            )
        if grammar is not None:
            g = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
            if not g:
                sampler.close()
                raise InvalidRequest(
                    "llama.cpp could not compile the grammar made from this schema"
                )
            llama_cpp.llama_sampler_chain_add(sampler.sampler, g)
        if s.greedy:
            sampler.add_greedy()
        else:
            if s.top_k > 0:
                sampler.add_top_k(s.top_k)
            if 0.0 < s.top_p < 1.0:
                sampler.add_top_p(s.top_p, 1)
            sampler.add_temp(s.temperature)
            sampler.add_dist(s.seed)
        return sampler

    def _eval_prompt(self, tokens: list[int], should_stop: ShouldStop, prefix: int = 0) -> None:
        """Decode the prompt, one batch per call.

        The first `prefix` tokens (a task's fixed instructions: the labels, the schema)
        are always decoded as a block of their own, starting from an empty cache. So when
        the next request has the same prefix its cached KV is exactly what a fresh decode
        would compute, and reusing it keeps replies byte-identical while skipping most of
        the prompt. Everything else starts from an empty cache.

        Between batches the worker answers pings and notices cancellation, so a long
        prompt neither looks like a hang nor outlives its caller.
        """
        llm = self.llm
        if prefix and self._cached_prefix == tokens[:prefix]:
            self.prefix_hits += 1
            llm.n_tokens = prefix  # eval() drops the cache beyond this point
        else:
            llm.reset()
            self._cached_prefix = []
            self._decode_batches(tokens[:prefix], should_stop)
            self._cached_prefix = tokens[:prefix]
        self._decode_batches(tokens[prefix:], should_stop)

    def _decode_batches(self, tokens: list[int], should_stop: ShouldStop) -> None:
        step = self.spec.batch
        for start in range(0, len(tokens), step):
            if start and should_stop():
                self._cached_prefix = []
                raise Stopped()
            self.llm.eval(tokens[start : start + step])

    def _task_prompt(self, messages: tuple[ChatMessage, ...]) -> tuple[list[int], int]:
        """Tokens of a (system, user) prompt and how many of them do not depend on the user text."""
        tokens = self._chat_tokens(messages)
        system = messages[:-1]
        fixed = self._fixed.get(system)
        if fixed is None:
            a = self._chat_tokens((*system, ChatMessage("user", "\x01")))
            b = self._chat_tokens((*system, ChatMessage("user", "\x02")))
            fixed = self._fixed[system] = a[: common_prefix(a, b)]
            if len(self._fixed) > 64:  # bounded: one entry per distinct instruction set
                self._fixed.pop(next(iter(self._fixed)))
        return tokens, common_prefix(tokens, fixed)

    def _last_logprobs(self) -> Row:
        ptr = self.llm._ctx.get_logits_ith(-1)
        return log_softmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)))

    def _generate(
        self,
        prompt: list[int],
        max_tokens: int | None,
        sampling: Sampling,
        grammar: str | None,
        emit: Emit | None,
        should_stop: ShouldStop,
        prefix: int = 0,
        top: int | None = None,
    ) -> Generation:
        """`top`: None = no per-token log-probabilities; k = them, with k alternatives each."""
        limit = self._check_fits(len(prompt), max_tokens)
        started = time.perf_counter()
        first_ms = 0.0
        text = TextAssembler(sampling.stop)
        logprobs: list[float] = []
        trail = LogprobTrail() if top is not None else None
        finish = "length"
        sampler = self._sampler(sampling, grammar)
        try:
            llm = self.llm
            self._eval_prompt(prompt, should_stop, prefix)
            pending: list[int] = []
            for _ in range(limit):
                if pending:
                    llm.eval(pending)
                token = int(sampler.sample(llm._ctx, -1))
                if not logprobs:
                    first_ms = (time.perf_counter() - started) * 1000
                # The raw model distribution: the sampler works on a copy of the logits, so
                # this is before penalties, temperature and any grammar mask.
                row = self._last_logprobs()
                logprobs.append(float(row[token]))
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    logprobs.pop()  # the end marker is not part of the answer
                    finish = "stop"
                    break
                data = llm.detokenize([token])
                piece = text.feed(data)
                if trail is not None:
                    alternatives = self._alternatives(row, top) if top else ()
                    trail.add(data, logprobs[-1], alternatives, len(text.text))
                if piece and emit is not None:
                    released = trail.released(text.text, text.released) if trail else ()
                    emit(TokenEvent(piece, released))
                if text.stopped:
                    finish = "stop"
                    break
                if should_stop():
                    raise Stopped()
                pending = [token]
        finally:
            sampler.close()
        tail = text.finish()
        rest = trail.rest(text.text) if trail is not None else ()
        if (tail or rest) and emit is not None:
            emit(TokenEvent(tail, rest))
        result = Generation(
            text=text.text,
            finish_reason="stop" if finish == "stop" else "length",
            usage=Usage(
                len(prompt), len(logprobs) + (1 if finish == "stop" and not text.stopped else 0)
            ),
            confidence=TokenConfidence.of(logprobs),
            logprobs=trail.all(text.text) if trail is not None else (),
        )
        result.timings.first_token_ms = first_ms
        return result

    def _alternatives(self, row: Row, k: int) -> tuple[TopLogprob, ...]:
        out = []
        for token, logprob in top_k(row, k):
            data = self.llm.detokenize([token])
            out.append(TopLogprob(data.decode("utf-8", errors="replace"), data, logprob))
        return tuple(out)

    # ------------------------------------------------------------------ classify

    def _classify(self, task: ClassifyTask, should_stop: ShouldStop) -> Classification:
        prompt, prefix = self._task_prompt(
            prompts.classify_messages(task.text, task.labels, task.instruction)
        )
        seqs = [[*self._tokenize(label, add_bos=False), self._end_of_turn] for label in task.labels]
        longest = max(len(s) for s in seqs)
        if longest > self.spec.batch:
            raise OutOfRange(
                f"a label is {longest - 1} tokens; labels may be at most {self.spec.batch - 1}"
            )
        self._check_fits(len(prompt), longest)
        self._eval_prompt(prompt, should_stop, prefix)
        if should_stop():
            raise Stopped()
        decoder = _LlamaPrefixDecoder(self)
        logps = score_sequences(decoder, len(prompt), self._last_logprobs(), seqs)
        probs = normalise(logps)
        scores = sorted(
            (
                LabelScore(label, p, lp)
                for label, p, lp in zip(task.labels, probs, logps, strict=True)
            ),
            key=lambda s: -s.probability,
        )
        return Classification(
            label=scores[0].label,
            scores=tuple(scores),
            usage=Usage(len(prompt), decoder.decoded),
        )

    # ------------------------------------------------------------------ extract

    def _extract(self, task: ExtractTask, should_stop: ShouldStop) -> Extraction:
        grammar = _grammar(task.schema)
        prompt, prefix = self._task_prompt(
            prompts.extract_messages(task.text, task.schema, task.instruction)
        )
        gen = self._generate(
            prompt, task.max_tokens, Sampling(), grammar, None, should_stop, prefix
        )
        if gen.finish_reason == "length":
            raise OutOfRange(
                f"the JSON was not complete after {gen.usage.completion_tokens} tokens: raise max_tokens"
            )
        try:
            answer = conforming_json(gen.text, task.schema)
        except SchemaViolation as e:
            raise SchemaViolation(
                f"the model's JSON does not satisfy the schema (the grammar cannot enforce every "
                f"JSON Schema keyword): {e.message}"
            ) from None
        result = Extraction(
            json=answer,
            usage=gen.usage,
            confidence=gen.confidence,
        )
        result.timings.first_token_ms = gen.timings.first_token_ms
        return result

    # ------------------------------------------------------------------ embed

    def _embed(self, task: EmbedTask) -> Embeddings:
        if self._embedder is None:
            # A second context on the same mmapped weights: embedding mode changes
            # how llama.cpp lays out outputs, so it cannot share the generation context.
            self._embedder = self._open(embedding=True)
        counts = []
        for i, text in enumerate(task.texts):
            # Counted as Llama.embed tokenizes (special strings are text there), which is
            # also linear in the text: parsing specials is quadratic in their number.
            n = len(self._embedder.tokenize(text.encode("utf-8"), add_bos=True, special=False))
            if n > self.spec.batch:
                raise OutOfRange(
                    f"texts[{i}] is {n} tokens; an embedded text may be at most {self.spec.batch} "
                    "(the model's `batch` setting)"
                )
            counts.append(n)
        vectors = self._embedder.embed(list(task.texts), normalize=task.normalize, truncate=False)
        return Embeddings(
            vectors=[list(map(float, v)) for v in vectors], usage=Usage(sum(counts), 0)
        )


def _grammar(schema: str) -> str:
    """GBNF for a schema, within bounds: llama.cpp's grammar parser overflows the stack
    (SIGSEGV) on deeply unrolled repetitions, and the converter can run for ever. The
    daemon checked the schema already; the process that would crash checks again."""
    bounded_schema(schema)
    try:
        grammar = json_schema_to_gbnf(schema).replace(_LOOSE_CHAR, _STRICT_CHAR)
    except Exception as e:  # the converter raises plain exceptions for what it cannot do
        raise converter_refusal(e) from None
    if len(grammar) > MAX_GRAMMAR_BYTES:
        raise InvalidRequest(
            f"the grammar made from json_schema is {len(grammar)} bytes; at most "
            f"{MAX_GRAMMAR_BYTES}: use smaller repetition counts or fewer properties"
        )
    return grammar


class _LlamaPrefixDecoder:
    """PrefixDecoder over the runner's context: decodes label tokens with logits for each."""

    def __init__(self, runner: LlamaRunner) -> None:
        self._r = runner
        self.decoded = 0

    def truncate(self, n_tokens: int) -> None:
        llm = self._r.llm
        llm.n_tokens = n_tokens
        llm._ctx.kv_cache_seq_rm(-1, n_tokens, -1)

    def decode(self, tokens: Sequence[int]) -> list[Row]:
        llm = self._r.llm
        llm._batch.set_batch(batch=list(tokens), n_past=llm.n_tokens, logits_all=True)
        llm._ctx.decode(llm._batch)
        llm.n_tokens += len(tokens)
        self.decoded += len(tokens)
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(tokens), self._r.n_vocab))
        rows = log_softmax(logits)
        return [rows[i] for i in range(len(tokens))]
