"""What the daemon tells a worker to load, and what the worker reports back.

Plain data that crosses the process boundary (pickled through spawn), so the daemon can
speak of workers without importing llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RunnerSpec:
    path: Path
    context: int
    threads: int
    batch: int
    default_max_tokens: int = 256
    parallel: int = 1  # sequences one worker decodes together (its job capacity)
    kv_cache: str = "f16"  # "f16" | "q8_0": the KV cache's element type
    # How the daemon logs (level, format), in `logs.current()`'s order; a slot stamps the
    # current one as it starts a worker, so that its workers log alike.
    log: tuple[str, str] = field(default=("info", "text"), compare=False)

    @property
    def kv_cells(self) -> int:
        """KV cache cells a worker allocates: a full window per sequence slot, plus one
        spare window for shared prefixes and whole jobs (Classify) between steps."""
        return self.context * (self.parallel + 1)

    @property
    def kv_bytes(self) -> float:
        """Bytes per cached key or value element (q8_0: 34 bytes per block of 32)."""
        return 34 / 32 if self.kv_cache == "q8_0" else 2.0


@dataclass(frozen=True)
class ModelFacts:
    n_ctx: int
    n_vocab: int
    n_embd: int
    chat_template: bool
