"""Write LoRA adapter GGUFs (llama.cpp's layout) for the tiny test models and SmolLM2.

The layout is what llama.cpp's convert_lora_to_gguf.py writes and src/llama-adapter.cpp
reads: general.type "adapter", adapter.type "lora", adapter.lora.alpha, and for each adapted
weight `W` (numpy shape (n_out, n_in)) a pair `<W>.lora_a` of numpy shape (rank, n_in) and
`<W>.lora_b` of numpy shape (n_out, rank) (gguf reverses numpy shapes into ggml order).
llama.cpp then computes W x + s * B (A x) with s = scale * alpha / rank (s = scale when
alpha is 0), which `merged` applies to the weights themselves for comparison.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import numpy.typing as npt
from gguf import GGUFReader, GGUFType

from tests.tiny_gguf import gguf_file

ATTENTION = ("attn_q", "attn_k", "attn_v", "attn_output")
F32 = npt.NDArray[np.float32]


def _target(name: str, targets: Iterable[str]) -> bool:
    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "blk" and parts[2] in targets and parts[3] == "weight"


def pair(name: str, n_out: int, n_in: int, rank: int, seed: int, std: float) -> tuple[F32, F32]:
    """The (A, B) of one weight: the same for the same name, shape, rank and seed."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    a = (rng.standard_normal((rank, n_in)) * std).astype(np.float32)
    b = (rng.standard_normal((n_out, rank)) * std).astype(np.float32)
    return a, b


def write_lora(
    path: Path,
    base: Path,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    std: float = 0.1,
    targets: Iterable[str] = ATTENTION,
    architecture: str | None = None,
    general_type: str = "adapter",
    shape_of: Callable[[str, int, int], tuple[int, int]] | None = None,
) -> Path:
    """An f32 LoRA adapter of `base` (any GGUF model) on its `targets` projections.

    `architecture`, `general_type` and `shape_of(name, n_out, n_in)` exist to write the
    mismatched adapters a store must refuse."""
    reader = GGUFReader(base)
    arch_field = reader.fields["general.architecture"]
    arch = architecture or bytes(arch_field.parts[arch_field.data[0]]).decode()
    targets = tuple(targets)
    with gguf_file(path, arch) as writer:
        writer.add_type(general_type if general_type != "adapter" else GGUFType.ADAPTER)
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", alpha)
        for t in reader.tensors:
            if not _target(t.name, targets):
                continue
            n_in, n_out = int(t.shape[0]), int(t.shape[1])  # ggml order
            if shape_of is not None:
                n_out, n_in = shape_of(t.name, n_out, n_in)
            a, b = pair(t.name, n_out, n_in, rank, seed, std)
            writer.add_tensor(f"{t.name}.lora_a", a)
            writer.add_tensor(f"{t.name}.lora_b", b)
    return path


def merged(
    *,
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    std: float = 0.1,
    scale: float = 1.0,
    targets: Iterable[str] = ATTENTION,
) -> Callable[[str, F32], F32]:
    """For `tiny_gguf.write_tiny_llama(adjust=...)`: W + s * B @ A on the adapted weights,
    s as llama.cpp scales it, so the file computes what base + adapter computes."""
    targets = tuple(targets)
    s = scale * alpha / rank if alpha else scale

    def adjust(name: str, w: F32) -> F32:
        if not _target(name, targets):
            return w
        a, b = pair(name, w.shape[0], w.shape[1], rank, seed, std)
        return (w.astype(np.float64) + s * (b.astype(np.float64) @ a)).astype(np.float32)

    return adjust
