"""Byte progress of a long admin operation (an update's fetch and rebuild) on stderr.

On a terminal it is a live tqdm bar, redrawn in place (tqdm pads each redraw to the
previous width, so a shorter line leaves nothing of a longer one behind). Anywhere else
(a pipe, a log file, journald) a redrawn line would be one ever-growing line of
carriage returns, so it prints plain lines instead: one when a stage starts, then one
each time another `STEP` of it is done or `EVERY_S` seconds have passed, and one at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

from tqdm import tqdm  # type: ignore[import-untyped]

STEP = 0.10  # of the stage's total
EVERY_S = 5.0


class ProgressDisplay:
    def __init__(
        self, stream: IO[str] | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._clock = clock
        self._bar: Any = None  # a tqdm while a stage is drawn on a terminal
        self._stage = ""
        self._detail = ""
        self._said = (-1.0, 0.0)  # (fraction, clock) of the last plain line

    def show(self, stage: str, detail: str, done: int, total: int) -> None:
        """`done` of `total` bytes of `stage`; a new stage ends the previous one."""
        if stage != self._stage:
            self.end()
            self._stage = stage
        if self._tty:
            self._draw(stage, detail, done, total)
            return
        fraction = done / total if total else 0.0
        last_fraction, last_at = self._said
        now = self._clock()
        if (
            fraction >= last_fraction + STEP
            or now - last_at >= EVERY_S
            or (done >= total and last_fraction < 1.0)
        ):
            self._said = (fraction, now)
            print(f"{stage}: {100 * fraction:3.0f}% {mb(done)} of {mb(total)} {detail}".rstrip(),
                  file=self._stream, flush=True)  # fmt: skip

    def end(self) -> None:
        """Finish the current stage's display (before other output, or at the end)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._stage = ""
        self._said = (-1.0, 0.0)

    def _draw(self, stage: str, detail: str, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = tqdm(
                total=total,
                desc=stage,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                file=self._stream,
                dynamic_ncols=True,
                leave=True,
                postfix=detail or None,
            )
            self._detail = detail
        bar = self._bar
        if total != bar.total:
            bar.total = total
        if detail != self._detail:
            self._detail = detail
            bar.set_postfix_str(detail, refresh=False)
        bar.update(done - bar.n)


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n} B"
