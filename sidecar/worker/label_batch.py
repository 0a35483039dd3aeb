"""Label continuations decoded together: one llama_decode per group of labels.

The prompt sits in one sequence of a unified KV cache. Each label of a group gets a
sequence id of its own (`first_label_seq` on); copying the prompt to it only tags the
prompt's cells with one more id. Every trie node goes in the batch once, tagged with
the ids of all labels through it, so a node attends to the prompt and its ancestors and
to nothing of the other branches. Afterwards the label sequences are removed (their cells
kept by the batch's garbage sequence, see `cells`): the prompt's sequence is alone again,
as the sequential scorer leaves it.

The rows are the sequential scorer's to the bit on SmolLM2 (tests/e2e/test_classify_batch.py):
with flash attention a row depends only on the cells its mask keeps, in cell order, and
a label's ancestors come before it in the batch as they did one after another. Two
conditions: ggml's CPU flash attention switches to a tiled kernel (other rounding; up to
1 nat apart on unlikely labels) for 64 or more query rows, which the sequential scorer
never reaches, so the nodes go in decodes of at most 63; and the weights' matmul must
round a row alike whatever the decode's size, which Q4_1 does and Gemma 3's Q4_K does
not (up to 0.3 nat apart, on labels below -40; the same label wins). Without flash
attention, sequences interleaved in one batch get wrong rows (0.4 nat off), not just
other rounding: this needs a context with flash attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import llama_cpp
import numpy as np

from sidecar.domain.errors import InternalError
from sidecar.worker.cells import CellLedger
from sidecar.worker.labels import NoRoom, Row, TrieNode, log_softmax

# ggml-cpu's GGML_FA_TILE_Q: a ubatch of this many tokens takes the tiled kernel.
FA_TILE_ROWS = 64


class LlamaTrieDecoder:
    """TrieDecoder over a llama.cpp context whose prompt is in `prompt_seq`."""

    def __init__(
        self, ctx: llama_cpp.llama_context_p, prompt_seq: int, n_vocab: int, cells: CellLedger
    ) -> None:
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._cells = cells
        self._prompt_seq = prompt_seq
        self._n_vocab = n_vocab
        self.first_label_seq = prompt_seq + 1
        # How much one decode can take: label ids left above the prompt's, batch rows.
        self.max_labels = cells.garbage - self.first_label_seq
        self.max_nodes = int(llama_cpp.llama_n_batch(ctx))
        if self.max_labels < 1:
            raise InternalError(f"no sequence id left above {prompt_seq} for label branches")

    def decode_trie(self, prompt_len: int, nodes: Sequence[TrieNode], n_labels: int) -> list[Row]:
        if not nodes:
            return []
        seqs = range(self.first_label_seq, self.first_label_seq + n_labels)
        step = FA_TILE_ROWS - 1
        batch = llama_cpp.llama_batch_init(min(len(nodes), step), 0, n_labels)
        picks: list[Row] = []
        try:
            for seq in seqs:
                llama_cpp.llama_memory_seq_cp(self._mem, self._prompt_seq, seq, -1, -1)
            # Depth-first, every node after its parent: each decode continues each
            # label's sequence where the previous one left it, as llama.cpp requires.
            for start in range(0, len(nodes), step):
                chunk = nodes[start : start + step]
                self._fill(batch, prompt_len, chunk)
                if self._cells.free < len(chunk):
                    raise NoRoom(f"no KV cells for {len(nodes)} label tokens")
                self._cells.take(len(chunk))
                rc = llama_cpp.llama_decode(self._ctx, batch)
                if rc == 1:
                    raise NoRoom(f"no KV cells for {len(nodes)} label tokens")
                if rc != 0:
                    raise InternalError(f"llama_decode returned {rc} for {len(chunk)} label tokens")
                picks += [self._picks(i, node) for i, node in enumerate(chunk)]
            return picks
        finally:
            for seq in seqs:
                self._cells.remove(seq)
            llama_cpp.llama_batch_free(batch)

    def _fill(self, batch: Any, prompt_len: int, nodes: Sequence[TrieNode]) -> None:
        # batch: a llama_batch; Any because the bindings type its arrays of arrays of
        # ids as arrays of ctypes arrays, which an int cannot be stored into.
        for i, node in enumerate(nodes):
            batch.token[i] = node.token
            batch.pos[i] = prompt_len + node.depth
            batch.n_seq_id[i] = len(node.labels)
            for j, label in enumerate(node.labels):
                batch.seq_id[i][j] = self.first_label_seq + label
            batch.logits[i] = True  # every decoded node has children
        batch.n_tokens = len(nodes)

    def _picks(self, i: int, node: TrieNode) -> Row:
        # Row by row: the whole (nodes x vocabulary) block is 400 MB for Gemma's vocabulary.
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, i)
        row = log_softmax(np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)))
        return row[list(node.children)]
