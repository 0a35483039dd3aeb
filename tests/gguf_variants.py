"""New versions of a GGUF file, made by byte surgery, for delta tests and the benchmark.

Every variant stays a loadable model: changed tensors get fresh random values that are
valid for their type (new quant nibbles under the old block scales for Q4_0/Q4_1/Q8_0,
new normal values for F32/F16; other types have their rows permuted). Fresh values, not
moved bytes, so byte-level diff tools cannot find the "new" data elsewhere in the old file.
"""

from __future__ import annotations

import random
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from sidecar.gguf_check import TensorInfo, check

_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@dataclass
class Layout:
    tensors: list[TensorInfo]
    offset_fields: dict[str, int]  # tensor name -> file position of its u64 data offset
    strings: dict[str, tuple[int, int]]  # metadata key -> (position of u64 length, length)
    header_end: int  # end of the tensor table, before the alignment padding
    data_start: int
    alignment: int
    size: int


def _skip_value(f: BinaryIO, kind: int) -> None:
    if kind in _SCALAR:
        f.seek(_SCALAR[kind], 1)
    elif kind == 8:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(n, 1)
    elif kind == 9:
        (inner,) = struct.unpack("<I", f.read(4))
        (count,) = struct.unpack("<Q", f.read(8))
        if inner in _SCALAR:
            f.seek(_SCALAR[inner] * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, inner)
    else:
        raise ValueError(f"unknown GGUF value type {kind}")


def layout(path: Path) -> Layout:
    info = check(path)
    offsets: dict[str, int] = {}
    strings: dict[str, tuple[int, int]] = {}
    with path.open("rb") as f:
        f.seek(8)
        n_tensors, n_kv = struct.unpack("<QQ", f.read(16))
        for _ in range(n_kv):
            (klen,) = struct.unpack("<Q", f.read(8))
            key = f.read(klen).decode()
            (kind,) = struct.unpack("<I", f.read(4))
            if kind == 8:
                pos = f.tell()
                (n,) = struct.unpack("<Q", f.read(8))
                strings[key] = (pos, n)
                f.seek(n, 1)
            else:
                _skip_value(f, kind)
        for _ in range(n_tensors):
            (nlen,) = struct.unpack("<Q", f.read(8))
            name = f.read(nlen).decode()
            (dims,) = struct.unpack("<I", f.read(4))
            f.seek(8 * dims + 4, 1)
            offsets[name] = f.tell()
            f.seek(8, 1)
        header_end = f.tell()
    return Layout(list(info.tensors), offsets, strings, header_end, info.data_start,
                  info.alignment, info.file_size)  # fmt: skip


def _rows(t: TensorInfo) -> int:
    rows = 1
    for d in t.shape[1:]:
        rows *= d
    return rows


# type -> (block bytes, bytes of scales at the start of each block that stay)
_QUANT = {2: (18, 2), 3: (20, 4), 8: (34, 2)}


def _fresh(
    path: Path, lay: Layout, t: TensorInfo, rows: list[int] | None = None, seed: int = 0
) -> None:
    """New random values for some (default: all) rows, valid for the tensor's type."""
    n = _rows(t)
    row = t.nbytes // n
    pick = rows if rows is not None else list(range(n))
    rng = np.random.default_rng(seed + t.offset)
    with path.open("r+b") as f:
        start = lay.data_start + t.offset
        for i in pick:
            f.seek(start + i * row)
            data = np.frombuffer(f.read(row), np.uint8).copy()
            if t.type in _QUANT:
                size, keep = _QUANT[t.type]
                blocks = data.reshape(-1, size)
                blocks[:, keep:] = rng.integers(0, 256, blocks[:, keep:].shape, dtype=np.uint8)
            elif t.type == 0:
                old = data.view(np.float32)
                data = (
                    (rng.standard_normal(old.shape) * (old.std() or 1.0))
                    .astype(np.float32)
                    .view(np.uint8)
                )
            elif t.type == 1:
                old = data.view(np.float16).astype(np.float32)
                data = (
                    (rng.standard_normal(old.shape) * (old.std() or 1.0))
                    .astype(np.float16)
                    .view(np.uint8)
                )
            else:
                _permute_rows(path, lay, t, [i, (i + 1) % n] if n > 1 else [i])
                continue
            f.seek(start + i * row)
            f.write(data.tobytes())


def _permute_rows(path: Path, lay: Layout, t: TensorInfo, rows: list[int] | None = None) -> None:
    """Reverse the order of some (default: all) rows of a tensor in place."""
    n = _rows(t)
    row = t.nbytes // n
    with path.open("r+b") as f:
        start = lay.data_start + t.offset
        f.seek(start)
        data = bytearray(f.read(t.nbytes))
        pick = rows if rows is not None else list(range(n))
        chunks = [bytes(data[i * row : (i + 1) * row]) for i in pick]
        for i, chunk in zip(pick, reversed(chunks), strict=True):
            data[i * row : (i + 1) * row] = chunk
        f.seek(start)
        f.write(data)


def _matrices(lay: Layout) -> list[TensorInfo]:
    return [t for t in lay.tensors if len(t.shape) >= 2 and _rows(t) >= 4]


def metadata_changed(src: Path, dst: Path, key: str = "tokenizer.chat_template") -> Path:
    """A new value for one string of metadata (default: the chat template)."""
    lay = layout(src)
    pos, n = lay.strings[key]
    raw = src.read_bytes()
    value = raw[pos + 8 : pos + 8 + n] + b"\n{# revised #}"
    header = raw[:pos] + struct.pack("<Q", len(value)) + value + raw[pos + 8 + n : lay.header_end]
    pad = -len(header) % lay.alignment
    with dst.open("wb") as f:
        f.write(header + b"\0" * pad)
        f.write(raw[lay.data_start :])
    return dst


def one_tensor_changed(src: Path, dst: Path) -> tuple[Path, int]:
    shutil.copyfile(src, dst)
    lay = layout(dst)
    mats = sorted(_matrices(lay), key=lambda t: t.nbytes)
    t = mats[len(mats) // 2]
    _fresh(dst, lay, t)
    return dst, t.nbytes


def block_changed(src: Path, dst: Path, block: int = 5) -> tuple[Path, int]:
    shutil.copyfile(src, dst)
    lay = layout(dst)
    changed = 0
    for t in lay.tensors:
        if t.name.startswith(f"blk.{block}."):
            _fresh(dst, lay, t)
            changed += t.nbytes
    if not changed:
        raise ValueError(f"{src} has no block {block}")
    return dst, changed


def tensors_reordered(src: Path, dst: Path) -> Path:
    """The same tensors, their data laid out in reverse order (the table is rewritten)."""
    lay = layout(src)
    raw = src.read_bytes()
    header = bytearray(raw[: lay.data_start])
    body = bytearray()
    for t in sorted(lay.tensors, key=lambda t: -t.offset):
        body += b"\0" * (-len(body) % lay.alignment)
        struct.pack_into("<Q", header, lay.offset_fields[t.name], len(body))
        start = lay.data_start + t.offset
        body += raw[start : start + t.nbytes]
    dst.write_bytes(bytes(header) + bytes(body))
    return dst


def sparse_edits(
    src: Path, dst: Path, tensor_fraction: float = 0.1, row_fraction: float = 0.03, seed: int = 0
) -> tuple[Path, int]:
    """A few percent of the rows of some tensors get new values."""
    shutil.copyfile(src, dst)
    lay = layout(dst)
    rnd = random.Random(seed)
    mats = _matrices(lay)
    chosen = rnd.sample(mats, max(1, int(len(mats) * tensor_fraction)))
    changed = 0
    for t in chosen:
        n = _rows(t)
        k = max(1, int(n * row_fraction))
        rows = sorted(rnd.sample(range(n), k))
        _fresh(dst, lay, t, rows, seed=seed)
        changed += t.nbytes
    return dst, changed
