"""The LoRA adapters one worker has loaded, and which one its context applies.

An adapter applies to a whole llama.cpp context, so the batch (`batch.BatchDecoder`) sets
one per decode step and switches only when no sequence runs (see `use`). Loaded adapters
stay cached (a load reads the file, ~ms per MB) up to `ADAPTERS_PER_WORKER`, least recently used out;
the one the context applies is never the one evicted. Each is freed deterministically,
before the model it was loaded against (`close`).

On an encrypted store the blob is ciphertext: the daemon hands the worker a descriptor of
the adapter's decrypted sealed memfd with the job (`offer`), and llama.cpp reads
`/proc/self/fd/N`. llama_adapter_lora_init copies the tensors into buffers of its own (it
reads the file, it does not map it), so the descriptor is closed right after the load.
"""

from __future__ import annotations

import ctypes
import os
from collections import OrderedDict
from typing import Any

import llama_cpp

from sidecar.domain.errors import FailedPrecondition
from sidecar.domain.specs import ADAPTERS_PER_WORKER
from sidecar.domain.types import AdapterFile


class LoraCache:
    def __init__(self, model: llama_cpp.llama_model_p, ctx: llama_cpp.llama_context_p) -> None:
        self._model = model
        self._ctx = ctx
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self.current: tuple[str, float] | None = None  # (sha256, scale) the context applies
        self.loads = 0
        self._fds: dict[str, int] = {}  # sha256 -> decrypted copy offered, not loaded yet

    def offer(self, sha: str, fd: int) -> None:
        """Take `fd`, a descriptor of adapter `sha`'s plaintext (the daemon's sealed memfd),
        to load it from instead of its blob; one per adapter, the newest."""
        old = self._fds.pop(sha, None)
        if old is not None:
            os.close(old)
        self._fds[sha] = fd

    def drop_offers(self) -> None:
        """Close the descriptors no job needs any more (the worker is idle)."""
        while self._fds:
            os.close(self._fds.popitem()[1])

    def _load(self, file: AdapterFile) -> Any:
        handle = self._loaded.get(file.sha256)
        if handle is not None:
            self._loaded.move_to_end(file.sha256)
            return handle
        fd = self._fds.pop(file.sha256, None)
        where = str(file.path) if fd is None else f"/proc/self/fd/{fd}"
        try:
            handle = llama_cpp.llama_adapter_lora_init(self._model, where.encode())
        finally:
            if fd is not None:  # read into llama.cpp's buffers: the plaintext copy can go
                os.close(fd)
        if not handle:
            raise FailedPrecondition(
                f"llama.cpp could not load adapter {file.name!r} ({file.path}): not a LoRA "
                "adapter of this model"
            )
        self.loads += 1
        self._loaded[file.sha256] = handle
        while len(self._loaded) > ADAPTERS_PER_WORKER:
            old, h = next(iter(self._loaded.items()))
            if self.current is not None and old == self.current[0]:
                self._loaded.move_to_end(old)
                continue
            del self._loaded[old]
            llama_cpp.llama_adapter_lora_free(h)
        return handle

    def use(self, file: AdapterFile | None) -> None:
        """Make the context apply `file` (None: the bare model) from the next decode on."""
        want = None if file is None else (file.sha256, file.scale)
        if want == self.current:
            return
        if file is None:
            rc = llama_cpp.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            handle = self._load(file)
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle)
            scales = (ctypes.c_float * 1)(file.scale)
            rc = llama_cpp.llama_set_adapters_lora(self._ctx, adapters, 1, scales)
        if rc != 0:
            raise FailedPrecondition(f"llama.cpp refused to apply the adapter (code {rc})")
        self.current = want

    @property
    def loaded(self) -> int:
        return len(self._loaded)

    def close(self) -> None:
        self.drop_offers()
        if self.current is not None:
            llama_cpp.llama_set_adapters_lora(self._ctx, None, 0, None)
            self.current = None
        while self._loaded:
            _, h = self._loaded.popitem()
            llama_cpp.llama_adapter_lora_free(h)
