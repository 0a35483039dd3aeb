"""Cheap structural checks of a GGUF file before anything tries to load it.

Reads only the header, metadata and tensor-info table (streamed, bounded), then checks
that every tensor's data lies inside the file. Catches truncated downloads, corrupt
tensor tables and files that are not GGUF at all, with a message that says which.

What the checker holds is bounded whatever the file declares: counts past what any real
model has are refused before anything is read, arrays are stepped over (only their type
and length are kept), and metadata strings are kept only up to `KEEP_BYTES` in total, so a
file of millions of tiny strings costs time in proportion to its size, not memory.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from sidecar.domain.errors import InvalidRequest

MAGIC = b"GGUF"
MAX_STRING = 16 * 1024 * 1024  # a chat template is kilobytes; this bounds a corrupt length
MAX_ARRAY = 1 << 24  # numeric arrays (scores, token types) have one item per token
MAX_STRING_ARRAY = 1 << 21  # vocabularies and merges are ~10^5 entries, 2.6*10^5 at most
MAX_KV = 10_000  # real models carry ~50 metadata keys
MAX_KEY = 256  # keys are dotted identifiers like "llama.attention.head_count"
MAX_TENSORS = 65_536  # the largest models have a few thousand tensors
MAX_TENSOR_NAME = 63  # llama.cpp refuses names of GGML_MAX_NAME (64) bytes or more
KEEP_BYTES = 1 << 20  # metadata strings kept in GGUFInfo, in total; the rest are skipped
MAX_DIMS = 8
DEFAULT_ALIGNMENT = 32
UINT32 = 4
SKIP_CHUNK = 1 << 16
_U64 = struct.Struct("<Q")

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
_TYPE_NAMES = {
    0: "uint8",
    1: "int8",
    2: "uint16",
    3: "int16",
    4: "uint32",
    5: "int32",
    6: "float32",
    7: "bool",
    8: "string",
    9: "array",
    10: "uint64",
    11: "int64",
    12: "float64",
}


class GGUFError(InvalidRequest):
    """The file is not a loadable GGUF; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type: int
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True, slots=True)
class Array:
    """A metadata array, stepped over: its item type and length, not its items."""

    item_type: int
    count: int


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
        self.kept = 0  # bytes of metadata strings held so far

    def take(self, n: int, what: str) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise GGUFError(f"truncated: the file ends inside the {what}")
        return data

    def skip(self, n: int, what: str) -> None:
        end = self.f.tell() + n
        if end > self.size:
            raise GGUFError(f"truncated: the file ends inside the {what}")
        self.f.seek(end)

    def unpack(self, fmt: str, what: str) -> int:
        raw = self.take(struct.calcsize("<" + fmt), what)
        return struct.unpack("<" + fmt, raw)[0]  # type: ignore[no-any-return]

    def length(self, what: str, limit: int = MAX_STRING) -> int:
        n = self.unpack("Q", what)
        if n > limit:
            raise GGUFError(f"corrupt {what}: a string of {n} bytes (limit {limit})")
        return n

    def string(self, what: str, limit: int = MAX_STRING) -> str:
        return self.take(self.length(what, limit), what).decode("utf-8", errors="replace")

    def value(self, kind: int, what: str) -> object:
        """A scalar, a string (None once KEEP_BYTES is spent: skipped, not read) or an Array."""
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind], what)
        if kind == 8:
            n = self.length(what)
            if self.kept + n > KEEP_BYTES:
                self.skip(n, what)
                return None
            self.kept += n
            return self.take(n, what).decode("utf-8", errors="replace")
        if kind == 9:
            return self.array(what)
        raise GGUFError(f"corrupt {what}: unknown value type {kind}")

    def skip_strings(self, count: int, what: str) -> None:
        """Step over `count` strings without making them: lengths are read from buffered
        chunks, the string bytes are never decoded (a vocabulary of 10^5 takes ~50 ms)."""
        buf, pos = b"", 0
        for _ in range(count):
            if len(buf) - pos < 8:
                buf, pos = buf[pos:] + self.f.read(SKIP_CHUNK), 0
                if len(buf) < 8:
                    raise GGUFError(f"truncated: the file ends inside the {what}")
            (n,) = _U64.unpack_from(buf, pos)
            if n > MAX_STRING:
                raise GGUFError(f"corrupt {what}: a string of {n} bytes (limit {MAX_STRING})")
            pos += 8 + n
            if pos > len(buf):  # a long string: seek past the rest of it
                self.skip(pos - len(buf), what)
                buf, pos = b"", 0
        self.f.seek(pos - len(buf), 1)  # give back what was read ahead
        if self.f.tell() > self.size:
            raise GGUFError(f"truncated: the file ends inside the {what}")

    def array(self, what: str) -> Array:
        item = self.unpack("I", what)
        count = self.unpack("Q", what)
        if item in _SCALARS:
            if count > MAX_ARRAY:
                raise GGUFError(f"corrupt {what}: an array of {count} items (limit {MAX_ARRAY})")
            self.skip(count * struct.calcsize(_SCALARS[item]), what)
        elif item == 8:
            if count > MAX_STRING_ARRAY:
                raise GGUFError(
                    f"corrupt {what}: an array of {count} strings (limit {MAX_STRING_ARRAY})"
                )
            self.skip_strings(count, what)
        else:
            raise GGUFError(f"corrupt {what}: arrays of type {item} are not supported")
        return Array(item, count)


def check(path: Path) -> GGUFInfo:
    """Parse and validate; raise GGUFError with the reason if the file is not sound."""
    with path.open("rb") as f:
        return check_stream(f, path.stat().st_size)


def check_stream(f: BinaryIO, size: int) -> GGUFInfo:
    """`check` of a seekable binary stream of `size` bytes (a decrypting reader included)."""
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
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise GGUFError(
            f"corrupt header: {n_tensors} tensors, {n_kv} metadata keys "
            f"(limits {MAX_TENSORS} and {MAX_KV})"
        )
    metadata: dict[str, object] = {}
    alignment = DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = r.string("metadata key", MAX_KEY)
        kind = r.unpack("I", f"metadata {key}")
        value = r.value(kind, f"metadata {key}")
        if key == "general.alignment":
            alignment = _alignment(kind, value)
        if value is not None:
            metadata[key] = value
    tensors = []
    for _ in range(n_tensors):
        name = r.string("tensor table", MAX_TENSOR_NAME)
        n_dims = r.unpack("I", "tensor table")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"corrupt tensor table: {name!r} has {n_dims} dimensions")
        shape = tuple(r.unpack("Q", "tensor table") for _ in range(n_dims))
        kind = r.unpack("I", "tensor table")
        offset = r.unpack("Q", "tensor table")
        tensors.append(_tensor(name, shape, kind, offset))
    header_end = f.tell()
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


def _alignment(kind: int, value: object) -> int:
    # llama.cpp accepts only a uint32 here; anything else (a string, a float such as inf,
    # an array) would otherwise reach int() and fail as a crash, not as a reason.
    if kind != UINT32 or not isinstance(value, int):
        shown = "" if isinstance(value, Array) else f" {value!r:.40}"
        raise GGUFError(
            "corrupt metadata: general.alignment must be a uint32, "
            f"not {_TYPE_NAMES.get(kind, f'type {kind}')}{shown}"
        )
    if value <= 0 or value & (value - 1):
        raise GGUFError(f"corrupt metadata: general.alignment {value} is not a power of two")
    return value


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
