"""BatchDecoder: continuous batching over one llama.cpp context.

The context has `parallel` generation slots (sequence ids 0..parallel-1) in one unified
KV cache, sized so that every slot still gets the model's full `context` window, plus
one spare window for the shared prefixes and for whole jobs (Classify) that run
between steps on sequence ids of their own (`free_seq`).

Each `step` is one `llama_decode`: one token for every sequence that is generating,
plus the next prompt block of sequences still reading their prompt. New requests join
between steps; a cancelled one leaves between steps (its cells are retired at once).

Determinism (measured on SmolLM2, CPU): flash attention is required (without it the
softmax runs over every cell of the cache and batched replies drift at once); calls of 64
rows or more take ggml's tiled attention kernel, so big prompt blocks are decoded in calls
of their own (`_plan`) with the boundaries they have alone (`Sequence.chunk`); and a call
of one row over 512 cells or more runs on one thread (`_set_threads`). scripts/setup also builds llama.cpp without
its llamafile kernels, which multiplied two rows or more differently from one (the demo
model's Q8_0 output layer), so a logit differed in its last bits between a sequence decoded
alone and beside others. With all that, the mixed-request test (tests/e2e/test_batching.py)
passed 1 of 3 runs here under load from other work. The last cause was the unified cache's
cell order (tests/e2e/test_cell_order.py): when a sequence's later tokens land in cells
before its earlier ones, its logits change (by up to 0.75 here, and the greedy reply with
them). llama.cpp puts new tokens at the cache's head and moves the head back to the first
cell a removal frees, so a finished or cancelled neighbour, a Classify job or an evicted
prefix would let a running sequence's next tokens land below its own. So with more than
one slot, cells are never freed while anything runs (`cells`): removed sequences are
retagged to a garbage id, the head only moves up, and the whole cache is emptied when the
batch is idle and more than half full, or when the next request's worst case (prompt +
max_tokens) does not fit beside the running ones' (then it waits for them: admission stays
in order). A whole job that does not fit raises NeedsRoom, and the worker holds admission
until the batch drains. With one slot, cells are freed as llama.cpp frees them: a request
then lands where it would alone, which kept cells would not give it, because with an f16
cache two kernels depend on where the cells lie (the tiled one for calls of 64 rows or
more, and the split one for a one-row call over 512 cells or more: tests/service/
test_workers.py failed 1 run in 3 with kept cells at one slot). For the same reason a long
prompt block beside other sequences can still round differently from alone at parallel > 1
with f16; a q8_0 cache (models.NAME.kv_cache) takes neither kernel.

Shared prefixes: a task's fixed instructions are decoded once into a prefix sequence
(ids parallel..parallel+PREFIXES-1) and copied to each request that starts with them,
which in a unified cache only tags the same cells with one more sequence id.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from sidecar.domain.errors import FailedPrecondition, InternalError, SidecarError
from sidecar.domain.specs import RunnerSpec, declared_head_widths, kv_cache_type
from sidecar.domain.types import AdapterFile, Result
from sidecar.worker.cells import CellLedger
from sidecar.worker.cores import CoreGovernor
from sidecar.worker.labels import TokenLogprob, log_softmax
from sidecar.worker.lora import LoraCache
from sidecar.worker.sequence import Detokenize, Sequence

PREFIXES = 4  # shared prefixes kept (LRU)
MIX_ROWS = 32  # rows a shared decode call stays below (see `_plan`)
BIG_BLOCKS_PER_STEP = 1
SPLIT_KV_CELLS = 512  # ggml-cpu/ops.cpp: a one-row f16 attention over this many splits
SPARE_SEQS = 128  # sequence ids above the slots and prefixes, for whole jobs (Classify)
KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}
ShouldStop = Callable[[], bool]
Outcome = tuple[Sequence, Result | SidecarError | None]  # None: cancelled


class Stopped(Exception):
    """The caller cancelled or its deadline passed; the worker is free again."""


class NeedsRoom(Exception):
    """A whole job's worst case does not fit beside the running sequences' now: it waits
    until the batch has drained (`hold`), then runs on an empty cache."""


@dataclass(eq=False)
class _Prefix:
    seq: int
    tokens: tuple[int, ...]
    ready: bool = False  # fully decoded (until then, only its writer uses it)


class BatchDecoder:
    def __init__(
        self, model: internals.LlamaModel, spec: RunnerSpec, detokenize: Detokenize
    ) -> None:
        self.spec = spec
        self.parallel = spec.parallel
        # llama.cpp caps a call at the cache's size, and its output buffer at n_seq_max
        # rows: both must agree with what we ask, or it aborts building the graph.
        # Ids: slots, prefixes, a whole job's prompt, one label branch at least, garbage.
        self.n_batch = min(max(spec.batch, MIX_ROWS, spec.parallel + PREFIXES + 3), spec.kv_cells)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = spec.kv_cells
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = min(  # llama.cpp reserves outputs for a batch of one per sequence
            llama_cpp.llama_max_parallel_sequences(),
            spec.parallel + PREFIXES + SPARE_SEQS,
            self.n_batch,
        )
        params.kv_unified = True
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        meta = model.metadata()
        widths = declared_head_widths(meta, meta.get("general.architecture", ""))
        self.kv_cache = kv_cache_type(spec.kv_cache, widths)
        params.n_threads = params.n_threads_batch = spec.threads
        self.ctx = self._context(model, params, fallback=spec.kv_cache == "auto")
        # ggml's CPU attention takes its split-cache and tiled paths only for f16/f32 caches.
        self._split_kv = self.kv_cache == "f16"
        self.n_seq_max = params.n_seq_max
        self.free_seq = spec.parallel + PREFIXES  # the first id whole jobs may use
        self._mem = llama_cpp.llama_get_memory(self.ctx.ctx)
        # The last id holds removed cells until the batch drains (see `cells`).
        size = min(spec.kv_cells, int(llama_cpp.llama_n_ctx(self.ctx.ctx)))
        self.cells = CellLedger(
            self.ctx.ctx, size, garbage=self.n_seq_max - 1, keep=spec.parallel > 1
        )
        self.hold = False  # admit nothing new: a whole job waits for the batch to drain
        self._vocab = model.vocab
        self._n_vocab = model.n_vocab()
        self._logprob = TokenLogprob(self._n_vocab)
        self._detokenize = detokenize
        self._batch = internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=2)
        self._slots = list(range(spec.parallel - 1, -1, -1))  # free generation seq ids
        self._prefixes: OrderedDict[tuple[int, ...], _Prefix] = OrderedDict()
        self._owner: dict[Sequence, _Prefix] = {}  # sequences writing a new prefix
        self.active: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.prefix_hits = 0
        self._threads = spec.threads
        self.governor = CoreGovernor(spec.threads)  # shared with the worker's embedder
        # The LoRA adapter applies to the whole context: see `_admit` and `use_adapter`.
        self.loras = LoraCache(model.model, self.ctx.ctx)
        self._refused: list[Outcome] = []  # sequences whose adapter failed to load

    def _context(
        self, model: internals.LlamaModel, params: llama_cpp.llama_context_params, fallback: bool
    ) -> internals.LlamaContext:
        params.type_k = params.type_v = KV_TYPES[self.kv_cache]
        try:
            return internals.LlamaContext(model=model, params=params, verbose=False)
        except ValueError:
            if self.kv_cache == "f16":
                raise
            if fallback:  # "auto" chose by the declared head widths; llama.cpp had the last word
                self.kv_cache = "f16"
                return self._context(model, params, fallback=False)
            raise FailedPrecondition(
                f"llama.cpp could not make a {self.kv_cache} KV cache for this model (it stores "
                "keys and values in blocks of 32, so each attention head must be a multiple of "
                'that wide): set this model\'s kv_cache = "f16" (or "auto")'
            ) from None

    def close(self) -> None:
        for s in [*self.active, *self.waiting]:
            s.sampler.close()  # type: ignore[no-untyped-call]
        self.loras.close()
        self._batch.close()  # type: ignore[no-untyped-call]
        self.ctx.close()  # type: ignore[no-untyped-call]

    @property
    def busy(self) -> bool:
        return bool(self.active or self.waiting)

    # ------------------------------------------------------------------ membership

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def cancel(self, key: int) -> None:
        for s in [*self.active, *self.waiting]:
            if s.key == key:
                s.cancelled = True

    def _admit(self) -> None:
        if not self.active and self.waiting and not self._prefixes and self.cells.high:
            # Nothing in the cache is worth keeping: empty it, so that the next sequence
            # lands from cell 0, as alone, and its one-token steps attend over few enough
            # cells to take every idle core (`_set_threads`).
            self._drain()
        while self.waiting and self._slots and not self.hold:
            s = self.waiting[0]
            if s.cancelled:
                return  # reported by `step`
            if not self._applies(s.lora):
                # One adapter per decode: a sequence of another waits, in order (the
                # daemon's fair queue chose that order), until the running ones finish.
                if self.active:
                    return
                try:
                    self._switch(s.lora)
                except SidecarError as e:
                    self.waiting.popleft()
                    s.sampler.close()  # type: ignore[no-untyped-call]
                    self._refused.append((s, e))
                    continue
            if not self._fits(len(s.prompt) + s.limit):
                if self.active:
                    return  # in order: it waits for the running ones to finish
                self._drain()
            self.waiting.popleft()
            s.seq = self._slots.pop()
            self._rm(s.seq)
            if 0 < s.prefix < len(s.prompt):
                self._attach_prefix(s)
            self.active.append(s)

    def _attach_prefix(self, s: Sequence) -> None:
        key = tuple(s.prompt[: s.prefix])
        entry = self._prefixes.get(key)
        if entry is not None and entry.ready:
            self._prefixes.move_to_end(key)
            llama_cpp.llama_memory_seq_cp(self._mem, entry.seq, s.seq, -1, -1)
            s.fed = s.prefix
            self.prefix_hits += 1
            return
        if entry is None:
            fresh = self._new_prefix(key)
            if fresh is not None:
                self._owner[s] = fresh
        # else: another request is writing it; this one decodes the prefix on its own

    def _new_prefix(self, key: tuple[int, ...]) -> _Prefix | None:
        """A prefix sequence to write `key` into (evicting the least recently used)."""
        if len(key) > self.spec.context // 2:
            return None  # the spare window also holds whole jobs
        used = {p.seq for p in self._prefixes.values()}
        free = [i for i in range(self.parallel, self.parallel + PREFIXES) if i not in used]
        if not free:
            old = next((k for k, p in self._prefixes.items() if p.ready), None)
            if old is None:
                return None
            free = [self._prefixes.pop(old).seq]
        self._rm(free[0])
        entry = self._prefixes[key] = _Prefix(free[0], key)
        return entry

    def _release(self, s: Sequence) -> None:
        s.sampler.close()  # type: ignore[no-untyped-call]
        if s in self.active:
            self.active.remove(s)
            self._rm(s.seq)
            self._slots.append(s.seq)
        entry = self._owner.pop(s, None)
        if entry is not None and not entry.ready:  # half written: useless
            self._prefixes.pop(entry.tokens, None)
            self._rm(entry.seq)

    def _rm(self, seq: int, p0: int = -1) -> None:
        self.cells.remove(seq, p0)

    # ------------------------------------------------------------------ room

    def _fits(self, cells: int) -> bool:
        """Whether `cells` more fit beside the worst case of every running sequence."""
        left = sum(max(0, len(s.prompt) + s.limit - s.fed) for s in self.active)
        return self.cells.used + left + cells <= self.cells.size

    def _drain(self) -> None:
        assert not self.active
        self.cells.drain()
        self._prefixes.clear()  # their cells are gone: the next user decodes them again

    def _applies(self, lora: AdapterFile | None) -> bool:
        return self.loras.current == (None if lora is None else (lora.sha256, lora.scale))

    def _switch(self, lora: AdapterFile | None) -> None:
        """Apply another adapter, on an empty cache: the shared prefixes were decoded with
        the old one and would be wrong under the new one."""
        assert not self.active
        self.loras.use(lora)
        self._drain()

    def use_adapter(self, lora: AdapterFile | None) -> None:
        """Before a whole job (Classify): apply its adapter, or raise NeedsRoom while
        sequences of another one run (the job then waits for the batch to drain)."""
        if self._applies(lora):
            return
        if self.active:
            raise NeedsRoom()
        self._switch(lora)

    def make_room(self, cells: int) -> None:
        """Before a whole job of at most `cells` cells: drain an idle cache that lacks the
        room, or raise NeedsRoom while sequences run."""
        if self._fits(cells):
            return
        if self.active:
            raise NeedsRoom()
        self._drain()

    # ------------------------------------------------------------------ one step

    def step(self) -> list[Outcome]:
        """Decode one step; returns the sequences that finished (and left) in it."""
        out: list[Outcome] = []
        for s in [*self.active, *self.waiting]:
            if s.cancelled:
                if s in self.waiting:
                    self.waiting.remove(s)
                self._release(s)
                out.append((s, None))
        self._admit()
        out += self._refused
        self._refused = []
        if not self.active:
            if not self.waiting and self.cells.used > self.cells.size // 2:
                self._drain()  # idle: start the next burst on an empty cache
            return out
        for fill in self._plan():
            self._batch.batch.n_tokens = 0
            rows = [(seq, fill_one()) for seq, fill_one in fill]
            try:
                self._decode()
            except SidecarError as e:
                for seq, _ in rows:
                    self._release(seq)
                    out.append((seq, e))
                continue
            for seq, i in rows:
                if i is None:
                    continue
                result = self._sample(seq, i)
                if result is not None:
                    self._release(seq)
                    out.append((seq, result))
        return out

    def _plan(self) -> list[list[tuple[Sequence, Callable[[], int | None]]]]:
        """This step's decode calls, each a list of (sequence, put its tokens in the batch;
        returns the index to sample from, if any).

        The CPU kernels compute a row differently once a batch reaches some size (64 rows
        here: measured), so a row's logits would depend on its neighbours. Generated
        tokens, and prompt blocks small enough, share a call of fewer than MIX_ROWS rows,
        the regime a lone token is in; a larger prompt block gets a call of its own,
        exactly as when its request runs alone."""
        calls: list[list[tuple[Sequence, Callable[[], int | None]]]] = []
        shared: list[tuple[Sequence, Callable[[], int | None]]] = []
        rows = 0
        for s in self.active:
            if s.prompt_done and s.next_token is not None:
                if rows + 1 >= MIX_ROWS:
                    calls.append(shared)
                    shared, rows = [], 0
                shared.append((s, self._token_fill(s)))
                rows += 1
        own = 0
        for s in self.active:
            if s.prompt_done:
                continue
            n = len(s.chunk(self.spec.batch))
            if rows + n < MIX_ROWS:
                shared.append((s, self._chunk_fill(s)))
                rows += n
            elif own < BIG_BLOCKS_PER_STEP:  # the rest wait: generation keeps flowing
                calls.append([(s, self._chunk_fill(s))])
                own += 1
        if shared:
            calls.insert(0, shared)
        return calls

    def _token_fill(self, s: Sequence) -> Callable[[], int | None]:
        def fill() -> int | None:
            assert s.next_token is not None
            i = self._put([s.next_token], s.fed, (s.seq,))
            s.fed += 1
            s.next_token = None
            return i

        return fill

    def _chunk_fill(self, s: Sequence) -> Callable[[], int | None]:
        def fill() -> int | None:
            chunk = s.chunk(self.spec.batch)
            entry = self._owner.get(s)
            ids = (s.seq, entry.seq) if entry is not None and s.fed < s.prefix else (s.seq,)
            i = self._put(chunk, s.fed, ids)
            s.fed += len(chunk)
            if entry is not None and s.fed >= s.prefix:
                entry.ready = True
                del self._owner[s]
            return i if s.prompt_done else None

        return fill

    def _put(self, tokens: list[int], pos: int, seqs: tuple[int, ...]) -> int:
        """Append tokens at positions pos.. (logits for the last); returns its index."""
        b = self._batch.batch
        for k, token in enumerate(tokens):
            j = b.n_tokens + k
            b.token[j] = token
            b.pos[j] = pos + k
            b.n_seq_id[j] = len(seqs)
            for n, seq in enumerate(seqs):
                b.seq_id[j][n] = seq
            b.logits[j] = False
        b.n_tokens += len(tokens)
        b.logits[b.n_tokens - 1] = True
        return int(b.n_tokens - 1)

    def _decode(self) -> None:
        self._set_threads(self._batch.n_tokens())
        self.cells.take(self._batch.n_tokens())
        rc = llama_cpp.llama_decode(self.ctx.ctx, self._batch.batch)
        if rc != 0:
            raise InternalError(
                f"llama_decode returned {rc} for a batch of {self._batch.n_tokens()}"
            )

    def _set_threads(self, rows: int) -> None:
        # Each step uses the cores other processes leave idle, up to `threads` (see `cores`),
        # except a call of one row on an f16 cache that attends over 512 cells or more: for
        # it ggml's CPU flash attention splits the cells between the threads, and the partial
        # sums then round differently for each thread count. One thread keeps such a step
        # bit-identical to the same sequence decoded beside others. Below 512 cells (a short
        # request on a drained cache), rows >= 2, or a q8_0 cache, each head's row is one
        # thread's whatever the count (tests/e2e/test_cell_order.py).
        split = rows == 1 and self._split_kv and self.cells.window(rows) >= SPLIT_KV_CELLS
        threads = 1 if split else self.governor.threads()
        if threads != self._threads:
            llama_cpp.llama_set_n_threads(self.ctx.ctx, threads, threads)
            self._threads = threads

    def _sample(self, s: Sequence, i: int) -> Result | SidecarError | None:
        """Sample `s`'s next token from row `i`; its outcome if that ends it, else None."""
        try:
            if s.limit <= 0:
                return s.result()
            logits = np.ctypeslib.as_array(self.ctx.get_logits_ith(i), shape=(self._n_vocab,))
            if s.argmax:
                token = int(np.argmax(logits))
            else:
                token = int(llama_cpp.llama_sampler_sample(s.sampler.sampler, self.ctx.ctx, i))
            row = log_softmax(logits) if s.top else None  # alternatives need the whole row
            if row is not None:
                logprob = float(row[token])
            else:
                logprob = self._logprob(logits, token, is_max=s.argmax)
            if s.accept(token, logprob, row, self._vocab, self._detokenize):
                return s.result()
            return None
        except SidecarError as e:
            return e

    # ------------------------------------------------------------------ whole jobs

    def decode_prompt(
        self, seq: int, tokens: list[int], prefix: int, should_stop: ShouldStop
    ) -> None:
        """Decode `tokens` into sequence `seq` (an id from `free_seq` on) on its own, between
        steps, with the same prefix blocks and cache as a generation; logits for the last
        token are then at index -1."""
        self._rm(seq)
        fed = 0
        shared = 0 < prefix < len(tokens)
        key = tuple(tokens[:prefix])
        entry = self._prefixes.get(key) if shared else None
        if entry is not None and entry.ready:
            self._prefixes.move_to_end(key)
            llama_cpp.llama_memory_seq_cp(self._mem, entry.seq, seq, -1, -1)
            self.prefix_hits += 1
            fed = prefix
        elif entry is None and shared:
            entry = self._new_prefix(key)
        else:
            entry = None
        step = self.spec.batch
        try:
            while fed < len(tokens):
                if fed and should_stop():
                    self._rm(seq)
                    raise Stopped()
                end = prefix if shared and fed < prefix else len(tokens)
                chunk = tokens[fed : min(end, fed + step)]
                ids = (seq, entry.seq) if entry is not None and fed < prefix else (seq,)
                self._batch.batch.n_tokens = 0
                self._put(chunk, fed, ids)
                self._decode()
                fed += len(chunk)
                if entry is not None and fed >= prefix:
                    entry.ready = True
        finally:
            if entry is not None and not entry.ready:
                self._prefixes.pop(key, None)
                self._rm(entry.seq)

    def clear(self, seq: int, p0: int = -1) -> None:
        """Free the cells of sequence `seq` from position p0 on (a whole job's)."""
        self._rm(seq, p0)
