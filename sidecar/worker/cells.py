"""The batch's KV cells: taken from the bottom up, and freed only all at once.

In one unified llama.cpp cache a sequence's logits depend on the order of its cells: when
its later tokens land in cells below its earlier ones, they change (tests/e2e/test_cell_order.py).
llama.cpp puts new tokens at the cache's head and moves the head back to the first cell a
removal frees, so freeing the cells of a finished neighbour below a running sequence would
let that sequence's next tokens land below its own. Here nothing is freed while anything
runs: a removed sequence's cells are handed to a reserved garbage sequence (which no token
attends to), so every cell below the head stays taken and the head only moves up. The
cache is emptied whole (`drain`) when nothing runs; until then `used` counts every cell
taken since the last drain, and the batch admits work only when its worst case fits.
With one generation slot (`keep=False`) cells are freed as llama.cpp frees them.

`high` bounds the highest cell taken (+1) since the cache was last empty, in both modes:
llama.cpp attends over that many cells rounded up to 256 (`window`), and ggml's CPU
attention splits a one-row call over 512 cells or more between its threads, which rounds
differently for each thread count (see BatchDecoder._set_threads).
"""

from __future__ import annotations

import llama_cpp

WINDOW_PAD = 256  # llama.cpp pads the cells a call attends over to a multiple of this


class CellLedger:
    def __init__(
        self, ctx: llama_cpp.llama_context_p, size: int, garbage: int, keep: bool = True
    ) -> None:
        self._mem = llama_cpp.llama_get_memory(ctx)
        # keep=False (one generation slot): cells are freed as llama.cpp does, which keeps
        # each request's cells where the same request alone would put them; nothing else
        # runs beside a sequence then but whole jobs, whose cells lie above it.
        self.keep = keep
        self.size = size
        self.garbage = garbage  # the sequence id that holds removed cells until a drain
        self.used = 0
        # A bound, not a count: a new token takes the first free cell at or above llama.cpp's
        # head, so the highest one grows by at most one per token taken.
        self.high = 0
        self.drains = 0

    @property
    def free(self) -> int:
        return self.size - self.used

    def take(self, n: int) -> None:
        """n tokens were decoded: each took one cell (a token shared by several
        sequences is one cell)."""
        self.high += n
        if self.keep:
            self.used += n

    def window(self, rows: int) -> int:
        """At most how many cells a call of `rows` more tokens attends over (llama.cpp's
        n_kv: the highest cell in use + 1, padded, within the cache)."""
        padded = -(-(self.high + rows) // WINDOW_PAD) * WINDOW_PAD
        return min(self.size, max(WINDOW_PAD, padded))

    def remove(self, seq: int, p0: int = -1) -> None:
        """Take sequence `seq`'s cells from position p0 on away from it (not freeing them)."""
        if self.keep:
            llama_cpp.llama_memory_seq_cp(self._mem, seq, self.garbage, p0, -1)
        llama_cpp.llama_memory_seq_rm(self._mem, seq, p0, -1)

    def drain(self) -> None:
        """Empty the whole cache (every sequence, shared prefixes too): only when nothing runs."""
        llama_cpp.llama_memory_clear(self._mem, False)
        self.used = 0
        self.high = 0
        self.drains += 1
