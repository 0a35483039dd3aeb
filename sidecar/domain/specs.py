"""What the daemon tells a worker to load, and what the worker reports back.

Plain data that crosses the process boundary (pickled through spawn), so the daemon can
speak of workers without importing llama.cpp.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ModelFd:
    """An open descriptor of the model's bytes (the sealed memfd of a decrypted blob).
    Pickled through spawn, it reaches the worker as the same descriptor number (the
    spawning process passes it), where llama.cpp opens `/proc/self/fd/N`."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing import reduction

        return (_model_fd, (reduction.DupFd(self.fd),))

    def __repr__(self) -> str:
        return f"ModelFd({self.fd})"


def _model_fd(dup: Any) -> ModelFd:
    fd = dup.detach()
    # Spawn passes it inheritable: anything the worker (or llama.cpp) starts must not get
    # the decrypted model too.
    os.set_inheritable(fd, False)
    return ModelFd(fd)


# LoRA adapters a worker keeps loaded (its cache, `worker.lora`); the memory budget counts
# this many of a model's largest active adapters per worker (`AdapterTable.loaded_bytes`).
ADAPTERS_PER_WORKER = 4


@dataclass(frozen=True)
class RunnerSpec:
    path: Path  # the store's blob (what the worker serves, and its version's name)
    context: int
    threads: int
    batch: int
    default_max_tokens: int = 256
    parallel: int = 1  # sequences one worker decodes together (its job capacity)
    kv_cache: str = "f16"  # "f16" | "q8_0" | "auto": the KV cache's element type
    # How the daemon logs (level, format), in `logs.current()`'s order; a slot stamps the
    # current one as it starts a worker, so that its workers log alike.
    log: tuple[str, str] = field(default=("info", "text"), compare=False)
    # Set as a worker starts on a sealed blob: the decrypted copy it maps instead of `path`.
    model_fd: ModelFd | None = field(default=None, compare=False)

    @property
    def model_file(self) -> str:
        """What llama.cpp opens: the decrypted copy in memory, else the blob itself."""
        return f"/proc/self/fd/{self.model_fd.fd}" if self.model_fd else str(self.path)

    @property
    def kv_cells(self) -> int:
        """KV cache cells a worker allocates: a full window per sequence slot, plus one
        spare window for shared prefixes and whole jobs (Classify) between steps."""
        return self.context * (self.parallel + 1)


Q8_0_BLOCK = 32  # elements per q8_0 block: a head must be a whole number of blocks


def declared_head_widths(meta: Mapping[str, object], arch: str) -> tuple[int, int]:
    """Width of one key head and one value head as a GGUF's metadata declares them:
    key_length/value_length where given (Gemma 3's heads are wider than embedding / heads),
    else embedding / heads. Values may be numbers (the header) or strings (llama.cpp's
    metadata): the daemon's memory estimate and the worker read the same rule."""

    def num(key: str, default: int = 0) -> int:
        value = meta.get(f"{arch}.{key}", default)
        try:
            return int(value)  # type: ignore[call-overload, no-any-return]
        except (TypeError, ValueError):
            return default

    width = num("embedding_length") // (num("attention.head_count", 1) or 1)
    return num("attention.key_length", width), num("attention.value_length", width)


def kv_cache_type(choice: str, head_widths: tuple[int, int]) -> str:
    """The KV cache type `choice` means for a model whose key and value heads are
    `head_widths` wide: "auto" takes q8_0 wherever its blocks fit the heads. Why q8_0:
    besides half the memory, ggml's attention then takes no per-thread-count or
    per-cell-layout kernel, so a one-token step may use every idle core and a batched
    sequence computes as it would alone (see `worker.batch`)."""
    if choice != "auto":
        return choice
    fits = all(w > 0 and w % Q8_0_BLOCK == 0 for w in head_widths)
    return "q8_0" if fits else "f16"


def kv_bytes(kind: str) -> float:
    """Bytes per cached key or value element of a resolved type (q8_0: 34 per block of 32)."""
    return 34 / 32 if kind == "q8_0" else 2.0


@dataclass(frozen=True)
class ModelFacts:
    n_ctx: int
    n_vocab: int
    n_embd: int
    chat_template: bool
