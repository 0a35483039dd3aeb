"""LlamaRunner: everything that touches llama.cpp, for one model, in one thread.

It owns its `Llama` objects and frees them deterministically in `close()`. It runs
in a worker process (the normal case) or in a thread of the daemon (the in-process
engine, for debugging); never on an event loop.

Generations run in the batch (`batch.BatchDecoder`, one context with a sequence slot
per concurrent request); each sequence starts from an empty KV cache (or a shared
prefix computed exactly as it would be alone): replies then depend only on the request
and the model file, which is what makes greedy decoding byte-identical across requests,
neighbours, workers and restarts. Classify and Embed run as whole jobs between steps.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from contextlib import ExitStack
from dataclasses import replace

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
    Overloaded,
    SchemaViolation,
    SidecarError,
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
    TokenEvent,
    Usage,
)
from sidecar.schema_limits import MAX_GRAMMAR_BYTES, bounded_schema, converter_refusal
from sidecar.validate import conforming_json
from sidecar.worker import label_scope, prompts
from sidecar.worker.batch import BatchDecoder, NeedsRoom, Stopped
from sidecar.worker.cores import resolve_max_threads
from sidecar.worker.embed import BatchEmbedder
from sidecar.worker.label_batch import LlamaTrieDecoder
from sidecar.worker.labels import NoRoom, Row, common_prefix, log_softmax, normalise, score_trie
from sidecar.worker.sequence import Sequence
from sidecar.worker.specials import SpecialTokens

Emit = Callable[[TokenEvent], None]

# llama-cpp-python's converter lets raw control characters into JSON strings, which
# strict JSON parsers reject; llama.cpp's own converter excludes them, so do the same.
_LOOSE_CHAR = 'char ::= [^"\\\\]'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F]'

ShouldStop = Callable[[], bool]
__all__ = ["LlamaRunner", "NeedsRoom", "Stopped"]


class LlamaRunner:
    def __init__(self, spec: RunnerSpec) -> None:
        # `threads` is a ceiling (0 = every usable CPU); each decode step asks the governor.
        spec = replace(spec, threads=resolve_max_threads(spec.threads))
        self.spec = spec
        self._stack = ExitStack()
        try:
            self.llm = self._open()
            # The batch's context replaces the one Llama made (which has one sequence):
            # Classify decodes on it too, on sequence ids above the generation slots.
            self.batch = BatchDecoder(self.llm._model, spec, self._piece)
            own, self.llm._ctx = self.llm._ctx, self.batch.ctx
            own.close()
            self._stack.callback(self.batch.close)
        except SidecarError:
            self._stack.close()
            raise
        except ValueError as e:  # llama-cpp-python's way of saying the file did not load
            self._stack.close()
            raise FailedPrecondition(f"cannot load model {spec.path}: {e}") from None
        # Whole jobs' sequence (Classify's prompt; its label branches may use the ids above).
        self.classify_seq = self.batch.free_seq
        self._embedder: BatchEmbedder | None = None
        self._specials: SpecialTokens | None = None
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

    def _open(self) -> llama_cpp.Llama:
        s = self.spec
        llm = llama_cpp.Llama(
            model_path=s.model_file,
            # A small context: the batch's replaces it (Embed has a context of its own).
            n_ctx=s.batch,
            n_batch=s.batch,
            n_ubatch=s.batch,
            n_threads=s.threads,
            n_threads_batch=s.threads,
            seed=0,
            verbose=False,
        )
        self._stack.callback(llm.close)
        return llm

    def close(self) -> None:
        self._stack.close()

    @property
    def prefix_hits(self) -> int:
        return self.batch.prefix_hits

    def _piece(self, token: int) -> bytes:
        return bytes(self.llm.detokenize([token]))

    # ------------------------------------------------------------------ dispatch

    def run(self, task: Task, emit: Emit | None, should_stop: ShouldStop) -> Result:
        """Run one job to its end (the in-process slot; whole jobs of a worker)."""
        seq = self.sequence(0, task, emit)
        if seq is None:
            return self.run_whole(task, should_stop)
        self.batch.add(seq)
        while True:
            if should_stop():
                self.batch.cancel(seq.key)
            for _, outcome in self.batch.step():
                if outcome is None:
                    raise Stopped()
                if isinstance(outcome, SidecarError):
                    raise outcome
                return outcome

    def sequence(self, key: int, task: Task, emit: Emit | None) -> Sequence | None:
        """A generation job as a sequence for the batch; None for a whole job."""
        seq = self._sequence(key, task, emit)
        if seq is not None and not isinstance(task, EmbedTask | ClassifyTask):
            seq.lora = task.lora
        return seq

    def _sequence(self, key: int, task: Task, emit: Emit | None) -> Sequence | None:
        if isinstance(task, GenerateTask | ChatTask):
            if isinstance(task, GenerateTask):
                tokens = self._tokenize(task.prompt, add_bos=True)
            else:
                tokens = self._chat_tokens(task.messages)
            top = task.top_logprobs if task.logprobs else None
            return self._generate(key, tokens, task.max_tokens, task.sampling, None, emit, top=top)
        if isinstance(task, ExtractTask):
            return self._extract(key, task)
        return None

    def run_whole(self, task: Task, should_stop: ShouldStop) -> Result:
        """Classify and Embed: run between batch steps, start to end."""
        if isinstance(task, ClassifyTask):
            self.batch.use_adapter(task.lora)  # NeedsRoom while another adapter's run
            try:
                return self._classify(task, should_stop)
            finally:
                self.batch.clear(self.classify_seq)
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
        if _penalised(s):
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
        """Decode a whole job's prompt into its own sequence (`classify_seq`), between batch
        steps, with the same prefix blocks (and shared prefix cache) as a generation.
        Between blocks the worker answers pings and notices cancellation."""
        self.batch.decode_prompt(self.classify_seq, tokens, prefix, should_stop)
        self.llm.n_tokens = len(tokens)

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
        key: int,
        prompt: list[int],
        max_tokens: int | None,
        sampling: Sampling,
        grammar: str | None,
        emit: Emit | None,
        prefix: int = 0,
        top: int | None = None,
        finish: Callable[[Generation], Result] | None = None,
    ) -> Sequence:
        """`top`: None = no per-token log-probabilities; k = them, with k alternatives each."""
        limit = self._check_fits(len(prompt), max_tokens)
        sampler = self._sampler(sampling, grammar)
        seq = Sequence(key, prompt, prefix, limit, sampler, emit, top, sampling.stop)
        seq.argmax = sampling.greedy and grammar is None and not _penalised(sampling)
        if finish is not None:
            seq.finish = finish
        return seq

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
        # Its worst case: the prompt and every label token (a trie shares some).
        self.batch.make_room(len(prompt) + sum(len(s) - 1 for s in seqs))
        self._eval_prompt(prompt, should_stop, prefix)
        if should_stop():
            raise Stopped()

        def between() -> None:
            if should_stop():
                raise Stopped()

        # All labels at once (a group per decode when they outnumber the free sequence
        # ids or the batch): the same scores as the sequential scorer (`labels.score_sequences`).
        decoder = LlamaTrieDecoder(
            self.llm._ctx.ctx, self.classify_seq, self.n_vocab, self.batch.cells
        )
        try:
            logps, decoded = score_trie(
                decoder,
                len(prompt),
                self._last_logprobs(),
                seqs,
                decoder.max_labels,
                decoder.max_nodes,
                between,
            )
        except NoRoom:
            raise Overloaded(
                "the worker's KV cache has no room for the labels now: retry"
            ) from None
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
            usage=Usage(len(prompt), decoded),
            novelty=label_scope.novelty(logps, [len(seq) for seq in seqs]),
        )

    # ------------------------------------------------------------------ extract

    def _extract(self, key: int, task: ExtractTask) -> Sequence:
        grammar = _grammar(task.schema)
        prompt, prefix = self._task_prompt(
            prompts.extract_messages(task.text, task.schema, task.instruction)
        )

        def finish(gen: Generation) -> Result:
            return _extraction(task, gen)

        return self._generate(
            key, prompt, task.max_tokens, Sampling(), grammar, None, prefix, finish=finish
        )

    # ------------------------------------------------------------------ embed

    def _embed(self, task: EmbedTask) -> Embeddings:
        (result,) = self.embed_many([task])
        if isinstance(result, OutOfRange):
            raise result
        return result

    def embed_many(self, tasks: Seq[EmbedTask]) -> list[Embeddings | OutOfRange]:
        """Several Embed jobs' texts decoded together; a job's error stays its own."""
        if self._embedder is None:
            # Its own context on the same model: embedding mode changes how llama.cpp
            # lays out outputs, so it cannot share the generation context.
            self._embedder = BatchEmbedder(self.llm._model, self.spec, self.batch.governor)
            self._stack.callback(self._embedder.close)
        return self._embedder.embed_many(tasks)


def _extraction(task: ExtractTask, gen: Generation) -> Extraction:
    """The finished grammar-constrained generation as an Extract answer."""
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
    result = Extraction(json=answer, usage=gen.usage, confidence=gen.confidence)
    result.timings.first_token_ms = gen.timings.first_token_ms
    return result


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


def _penalised(s: Sampling) -> bool:
    """Whether the sampler chain takes a repeat penalty (0 and 1 both mean none)."""
    return s.repeat_penalty not in (0.0, 1.0)
