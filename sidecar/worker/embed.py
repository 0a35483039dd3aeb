"""Embedding in batches: the texts of one or several Embed jobs in as few decodes as fit.

The context keeps a KV stream per sequence (`kv_unified` off). With one shared stream a
text's vector depended on its neighbours in the decode (up to 2e-3 per component, measured
on SmolLM2-135M: the attention sums run over cells whose position depends on who came
before); with a stream each, every text sees its own cells from 0, so its vector is the
same alone or beside any others, and a few-shot build gives the same vectors however its
texts were packed into jobs, resumed or not. Streams are at least 256 cells (llama.cpp
pads them), so `STREAMS` bounds the KV memory: STREAMS x max(256, batch) cells.

Pooling is done here, not by llama.cpp (its mean is per micro-batch): each text's token
rows are averaged in float64, in order. The texts of one decode are padded at their end to
one token length (see `means`).
"""

from __future__ import annotations

from collections.abc import Sequence

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp import _internals as internals

from sidecar.domain.errors import OutOfRange
from sidecar.domain.specs import RunnerSpec
from sidecar.domain.types import Embeddings, EmbedTask, Usage
from sidecar.worker.cores import CoreGovernor

STREAMS = 8  # texts per decode at most: 8 x 512 cells of KV for the default batch

F32 = npt.NDArray[np.float32]


class BatchEmbedder:
    """An embedding context on a loaded model; owns the context, not the model."""

    def __init__(
        self, model: internals.LlamaModel, spec: RunnerSpec, governor: CoreGovernor | None = None
    ) -> None:
        self._model = model
        self._governor = governor
        self._threads = spec.threads
        self._batch_tokens = spec.batch
        self.streams = max(1, min(STREAMS, spec.batch, llama_cpp.llama_max_parallel_sequences()))
        p = llama_cpp.llama_context_default_params()
        cells = max(256, -(-spec.batch // 256) * 256)
        p.n_ctx = cells * self.streams
        p.n_batch = p.n_ubatch = spec.batch
        p.n_seq_max = self.streams
        p.kv_unified = False
        p.n_threads = p.n_threads_batch = spec.threads
        p.embeddings = True
        p.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as Llama(...) had it
        self.ctx = internals.LlamaContext(model=model, params=p, verbose=False)
        self._batch = internals.LlamaBatch(n_tokens=spec.batch, embd=0, n_seq_max=1, verbose=False)
        self.n_embd = model.n_embd()
        self.decodes = 0  # how many llama_decode calls so far (tests, metrics)
        self.padding = 0  # tokens decoded only to make a decode's texts one length

    def close(self) -> None:
        self._batch.close()  # type: ignore[no-untyped-call]
        self.ctx.close()  # type: ignore[no-untyped-call]

    def tokens(self, text: str) -> list[int]:
        # As Llama.embed tokenized: special strings are text here, which also keeps
        # counting linear in the text (parsing specials is quadratic in their number).
        return list(self._model.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def embed_many(self, tasks: Sequence[EmbedTask]) -> list[Embeddings | OutOfRange]:
        """Every task's vectors, its texts decoded together with the other tasks' texts.

        A task with a text longer than `batch` tokens gets its OutOfRange in its place;
        the others are unaffected (and their vectors do not depend on who they shared a
        decode with).
        """
        out: list[Embeddings | OutOfRange] = []
        flat: list[list[int]] = []
        for task in tasks:
            toks = [self.tokens(text) for text in task.texts]
            err = self._too_long(toks)
            if err is not None:
                out.append(err)
                continue
            out.append(Embeddings(vectors=[], usage=Usage(sum(map(len, toks)), 0)))
            flat.extend(toks)
        means = self.means(flat)
        start = 0
        for task, result in zip(tasks, out, strict=True):
            if isinstance(result, Embeddings):
                n = len(task.texts)
                result.vectors = _as_lists(means[start : start + n], task.normalize)
                start += n
        return out

    def _too_long(self, toks: list[list[int]]) -> OutOfRange | None:
        for i, t in enumerate(toks):
            if len(t) > self._batch_tokens:
                return OutOfRange(
                    f"texts[{i}] is {len(t)} tokens; an embedded text may be at most "
                    f"{self._batch_tokens} (the model's `batch` setting)"
                )
        return None

    def means(self, texts: Sequence[list[int]]) -> F32:
        """The mean token embedding of each tokenized text, shape (len(texts), n_embd).

        Every text of a decode is padded at its end to the longest one's length: llama.cpp
        then takes each in one micro-batch, as when it is alone (texts of unequal lengths
        are split into several micro-batches, and a text continued in a later one came out
        different: up to 5e-2 on SmolLM2-135M). Padding at the end changes nothing before
        it (attention is causal, and each text has its own KV stream), and only the
        text's own rows are averaged. Texts go in length order, so neighbours are of
        nearly one length and little is wasted on padding.
        """
        out = np.empty((len(texts), self.n_embd), np.float32)
        order = sorted(range(len(texts)), key=lambda k: len(texts[k]))
        i = 0
        while i < len(order):
            j = i + 1
            while (
                j < len(order)
                and j - i < self.streams
                and (j - i + 1) * len(texts[order[j]]) <= self._batch_tokens
            ):
                j += 1
            group = order[i:j]
            out[group] = self._decode([texts[k] for k in group])
            i = j
        return out

    def _decode(self, texts: Sequence[list[int]]) -> F32:
        if self._governor is not None:  # the cores other processes leave idle, as in `batch`
            threads = self._governor.threads()
            if threads != self._threads:
                llama_cpp.llama_set_n_threads(self.ctx.ctx, threads, threads)
                self._threads = threads
        width = max(map(len, texts))  # the last text is the longest (length order)
        self.ctx.kv_cache_clear()  # type: ignore[no-untyped-call]
        self._batch.reset()  # type: ignore[no-untyped-call]
        for seq, toks in enumerate(texts):
            self._batch.add_sequence(toks + toks[-1:] * (width - len(toks)), seq, True)
        self.ctx.decode(self._batch)
        self.decodes += 1
        self.padding += width * len(texts) - sum(map(len, texts))
        ptr = llama_cpp.llama_get_embeddings(self.ctx.ctx)
        rows = np.ctypeslib.as_array(ptr, shape=(width * len(texts), self.n_embd))
        out = np.empty((len(texts), self.n_embd), np.float32)
        for k, toks in enumerate(texts):
            out[k] = rows[k * width : k * width + len(toks)].mean(axis=0, dtype=np.float64)
        return out


def _as_lists(rows: F32, normalize: bool) -> list[list[float]]:
    """Vectors as the reply carries them: normalised in float64, as Llama.embed did."""
    v = rows.astype(np.float64)
    if normalize:
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        v = np.divide(v, norms, out=v, where=norms != 0)  # a zero vector stays as it is
    out: list[list[float]] = v.tolist()
    return out
