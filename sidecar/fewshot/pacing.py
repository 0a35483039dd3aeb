"""Sizing the Embed jobs of a few-shot build so each takes about `TARGET_S` on a worker.

A worker answers no supervisor ping while it embeds, so a job must stay well under the
ping interval, or a slow or busy machine gets the worker killed as hung mid-build. A
fixed count of texts cannot promise that: the same 16 texts take 0.2 s on an idle
desktop and 15 s on a loaded two-core VM (measured: ~35 prompt tokens/s there). So
the size of the next job follows the measured speed (bytes of text per second on a
worker, excluding queue time), between one text and `MAX_TEXTS` texts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

TARGET_S = 0.5  # a quarter of the default server.ping_interval_seconds
START_BYTES = 64  # before anything is measured (the first job also opens the context)
MAX_BYTES = 16 * 1024
MAX_TEXTS = 16
SMOOTHING = 0.3  # weight of the newest measurement


class Pacer:
    def __init__(self) -> None:
        self.bytes_per_s: float | None = None

    def budget(self) -> int:
        """Bytes of text the next job may carry."""
        if self.bytes_per_s is None:
            return START_BYTES
        return int(min(max(self.bytes_per_s * TARGET_S, 1.0), MAX_BYTES))

    def record(self, nbytes: int, seconds: float) -> None:
        rate = nbytes / max(seconds, 1e-3)
        old = self.bytes_per_s
        self.bytes_per_s = rate if old is None else (1 - SMOOTHING) * old + SMOOTHING * rate


def size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def take(pending: deque[int], texts: Sequence[str], budget: int) -> list[int]:
    """The next job: indices from the front of `pending` within `budget` bytes and
    MAX_TEXTS texts, always at least one (a single long text goes alone)."""
    chunk: list[int] = []
    used = 0
    while pending and len(chunk) < MAX_TEXTS:
        n = size(texts[pending[0]])
        if chunk and used + n > budget:
            break
        chunk.append(pending.popleft())
        used += n
    return chunk
