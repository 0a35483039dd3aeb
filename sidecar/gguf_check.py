"""Cheap structural checks of a GGUF file before anything tries to load it.

Reads only the header, metadata and tensor-info table (streamed, bounded), then checks
that every tensor's data lies inside the file. Catches truncated downloads, corrupt
tensor tables and files that are not GGUF at all, with a message that says which.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from sidecar.errors import InvalidRequest

MAGIC = b"GGUF"
MAX_STRING = 16 * 1024 * 1024  # a chat template is kilobytes; this bounds a corrupt length
MAX_ARRAY = 1 << 24  # vocabularies are ~10^5 entries
MAX_DIMS = 8
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> struct format (scalars); 8 = string, 9 = array.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}


class GGUFError(InvalidRequest):
    """The file is not a loadable GGUF; the message says what is wrong."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type: int
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class GGUFInfo:
    version: int
    metadata: dict[str, object]
    tensors: tuple[TensorInfo, ...]
    data_start: int
    file_size: int
    alignment: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


class _Reader:
    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f = f
        self.size = size

    def take(self, n: int, what: str) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise GGUFError(f"truncated: the file ends inside the {what}")
        return data

    def unpack(self, fmt: str, what: str) -> int:
        raw = self.take(struct.calcsize("<" + fmt), what)
        return struct.unpack("<" + fmt, raw)[0]  # type: ignore[no-any-return]

    def string(self, what: str) -> str:
        n = self.unpack("Q", what)
        if n > MAX_STRING:
            raise GGUFError(f"corrupt {what}: a string of {n} bytes")
        return self.take(n, what).decode("utf-8", errors="replace")

    def value(self, kind: int, what: str, depth: int = 0) -> object:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind], what)
        if kind == 8:
            return self.string(what)
        if kind == 9 and depth == 0:
            item = self.unpack("I", what)
            count = self.unpack("Q", what)
            if count > MAX_ARRAY:
                raise GGUFError(f"corrupt {what}: an array of {count} items")
            if item in _SCALARS:  # skip numeric arrays without building them
                self.take(count * struct.calcsize(_SCALARS[item]), what)
                return count
            return [self.value(item, what, depth + 1) for _ in range(count)]
        raise GGUFError(f"corrupt {what}: unknown value type {kind}")


def check(path: Path) -> GGUFInfo:
    """Parse and validate; raise GGUFError with the reason if the file is not sound."""
    size = path.stat().st_size
    with path.open("rb") as f:
        r = _Reader(f, size)
        if size < 24:
            raise GGUFError(f"not a GGUF file: only {size} bytes")
        if r.take(4, "magic") != MAGIC:
            raise GGUFError("not a GGUF file: wrong magic bytes (expected 'GGUF')")
        version = r.unpack("I", "header")
        if version not in (2, 3):
            raise GGUFError(f"unsupported GGUF version {version} (expected 2 or 3)")
        n_tensors = r.unpack("Q", "header")
        n_kv = r.unpack("Q", "header")
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise GGUFError(f"corrupt header: {n_tensors} tensors, {n_kv} metadata keys")
        metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = r.string("metadata key")
            metadata[key] = r.value(r.unpack("I", f"metadata {key}"), f"metadata {key}")
        tensors = []
        for _ in range(n_tensors):
            name = r.string("tensor table")
            n_dims = r.unpack("I", "tensor table")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(f"corrupt tensor table: {name!r} has {n_dims} dimensions")
            shape = tuple(r.unpack("Q", "tensor table") for _ in range(n_dims))
            kind = r.unpack("I", "tensor table")
            offset = r.unpack("Q", "tensor table")
            tensors.append(_tensor(name, shape, kind, offset))
        header_end = f.tell()
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))  # type: ignore[call-overload]
    if alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"corrupt metadata: general.alignment {alignment} is not a power of two")
    data_start = -(-header_end // alignment) * alignment
    for t in tensors:
        if t.offset % alignment:
            raise GGUFError(f"corrupt tensor table: {t.name!r} is not aligned to {alignment}")
        end = data_start + t.offset + t.nbytes
        if end > size:
            raise GGUFError(
                f"truncated: tensor {t.name!r} needs bytes up to {end} but the file has {size}"
            )
    return GGUFInfo(version, metadata, tuple(tensors), data_start, size, alignment)


def _tensor(name: str, shape: tuple[int, ...], kind: int, offset: int) -> TensorInfo:
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        raise GGUFError(f"corrupt tensor table: {name!r} has unknown type {kind}") from None
    elements = 1
    for d in shape:
        elements *= d
    if shape[0] % block:
        raise GGUFError(
            f"corrupt tensor table: {name!r} row of {shape[0]} is not a multiple of {block}"
        )
    return TensorInfo(name, shape, kind, offset, elements // block * type_size)
