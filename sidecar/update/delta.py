"""Model deltas: rebuild a new file from an old one plus the bytes that changed.

Layout (all integers little-endian)::

    b"SCDELTA1"  u32 header_len  header (JSON: base/target sha256 + size, mode)
    op*          one byte kind, then its fields
    0x00         end

    COPY  0x01  u64 src_offset  u64 length                      old[src:src+len]
    DATA  0x02  u32 raw_len  u32 zlen  zstd(bytes)              literal bytes
    XOR   0x03  u64 src_offset  u32 raw_len  u32 zlen  zstd(x)  old[src:src+raw] XOR x
    DICT  0x04  u64 dict_offset  u32 dict_len  u32 raw_len  u32 zlen  zstd(bytes, dict)
                                                                zstd with old[dict] as a raw
                                                                content dictionary
    COPIES 0x05 u32 count  u32 zlen  zstd(count x (u64 src, u64 length))
                                                                a run of COPYs, compressed: a
                                                                reordered file is all copies

Ops write the target front to back. No op carries more than `PIECE` raw bytes, so apply
holds one piece (plus the GGUF header's dictionary) in memory whatever the model size.

`make_delta` understands GGUF ("gguf" mode): the new header, metadata and tensor table
are one DICT op against the old header (a changed chat template costs its own bytes, not
the vocabulary's); each tensor of the new file is a COPY of any old tensor with the same
bytes (found by content hash, so renames, reorders and moved offsets cost nothing), an XOR
against the old tensor of the same name and size (sparse edits compress to almost
nothing), or literal data, whichever is smallest. Files it cannot parse ("cdc" mode) are
cut into content-defined chunks (a rolling sum of per-byte random values decides the
boundaries, so an insertion shifts only the chunks it touches) and chunks the old file
has are copied.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import zstandard

from sidecar.gguf_check import GGUFError, GGUFInfo, check

MAGIC = b"SCDELTA1"
PIECE = 4 * 1024 * 1024  # raw bytes per op, and the read size of COPY
LEVEL = 3
MAX_DICT = 48 * 1024 * 1024  # a header bigger than this is sent as plain data
CDC_MASK = (1 << 16) - 1  # ~64 KiB average chunk
CDC_MIN, CDC_MAX, CDC_WINDOW = 16 * 1024, 256 * 1024, 48

COPY, DATA, XOR, DICT, COPIES, END = 1, 2, 3, 4, 5, 0
MAX_COPIES = PIECE // 16


class DeltaError(Exception):
    """A delta that cannot be applied: corrupt, truncated, or made from another base."""


@dataclass(frozen=True)
class DeltaInfo:
    base_sha256: str
    base_size: int
    target_sha256: str
    target_size: int
    payload_bytes: int
    ops: int
    mode: str


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(PIECE):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- writing ops


class _Writer:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.ops = 0
        self.payload = 0
        self._zc = zstandard.ZstdCompressor(level=LEVEL)
        self._copies: list[tuple[int, int]] = []

    def _flush_copy(self) -> None:
        if not self._copies:
            return
        if len(self._copies) == 1:
            src, length = self._copies[0]
            self.out.write(struct.pack("<BQQ", COPY, src, length))
        else:
            packed = b"".join(struct.pack("<QQ", s, n) for s, n in self._copies)
            z = self._zc.compress(packed)
            self.out.write(struct.pack("<BII", COPIES, len(self._copies), len(z)))
            self.out.write(z)
            self.payload += len(z)
        self.ops += 1
        self._copies = []

    def copy(self, src: int, length: int) -> None:
        if length <= 0:
            return
        if self._copies and sum(self._copies[-1]) == src:  # contiguous in the old file
            last = self._copies[-1]
            self._copies[-1] = (last[0], last[1] + length)
            return
        if len(self._copies) >= MAX_COPIES:
            self._flush_copy()
        self._copies.append((src, length))

    def data(self, raw: bytes) -> None:
        self._flush_copy()
        for start in range(0, len(raw), PIECE):
            piece = raw[start : start + PIECE]
            z = self._zc.compress(piece)
            self.out.write(struct.pack("<BII", DATA, len(piece), len(z)))
            self.out.write(z)
            self.ops += 1
            self.payload += len(z)

    def changed(self, raw: bytes, old: bytes | None, src: int) -> None:
        """Literal or XOR against `old` (same length), whichever compresses smaller."""
        self._flush_copy()
        literal = self._zc.compress(raw)
        if old is not None and len(old) == len(raw):
            x = np.bitwise_xor(np.frombuffer(raw, np.uint8), np.frombuffer(old, np.uint8))
            xz = self._zc.compress(x.tobytes())
            if len(xz) < len(literal):
                self.out.write(struct.pack("<BQII", XOR, src, len(raw), len(xz)))
                self.out.write(xz)
                self.ops += 1
                self.payload += len(xz)
                return
        self.out.write(struct.pack("<BII", DATA, len(raw), len(literal)))
        self.out.write(literal)
        self.ops += 1
        self.payload += len(literal)

    def dict_data(self, raw: bytes, dict_offset: int, dictionary: bytes) -> None:
        self._flush_copy()
        zd = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        z = zstandard.ZstdCompressor(level=12, dict_data=zd).compress(raw)
        self.out.write(struct.pack("<BQIII", DICT, dict_offset, len(dictionary), len(raw), len(z)))
        self.out.write(z)
        self.ops += 1
        self.payload += len(z)

    def end(self) -> None:
        self._flush_copy()
        self.out.write(bytes([END]))


# ---------------------------------------------------------------- make


def _ranges(offset: int, length: int) -> Iterator[tuple[int, int]]:
    end = offset + length
    while offset < end:
        n = min(PIECE, end - offset)
        yield offset, n
        offset += n


def _read(f: BinaryIO, offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)


def _tensor_hashes(f: BinaryIO, info: GGUFInfo) -> dict[str, tuple[int, int]]:
    """sha256 of each tensor's bytes -> (absolute offset, length)."""
    out: dict[str, tuple[int, int]] = {}
    for t in info.tensors:
        start = info.data_start + t.offset
        h = hashlib.sha256()
        for off, n in _ranges(start, t.nbytes):
            h.update(_read(f, off, n))
        out.setdefault(h.hexdigest(), (start, t.nbytes))
    return out


def _make_gguf(w: _Writer, old: BinaryIO, new: BinaryIO, oi: GGUFInfo, ni: GGUFInfo) -> None:
    header = _read(new, 0, ni.data_start)
    if oi.data_start <= MAX_DICT:
        w.dict_data(header, 0, _read(old, 0, oi.data_start))
    else:
        w.data(header)
    old_by_hash = _tensor_hashes(old, oi)
    old_by_name = {t.name: (oi.data_start + t.offset, t.nbytes) for t in oi.tensors}
    pos = ni.data_start
    for t in sorted(ni.tensors, key=lambda t: t.offset):
        start = ni.data_start + t.offset
        if start > pos:  # alignment padding
            w.data(_read(new, pos, start - pos))
        h = hashlib.sha256()
        for off, n in _ranges(start, t.nbytes):
            h.update(_read(new, off, n))
        same = old_by_hash.get(h.hexdigest())
        if same is not None and same[1] == t.nbytes:
            w.copy(same[0], t.nbytes)
        else:
            counterpart = old_by_name.get(t.name)
            if counterpart is not None and counterpart[1] != t.nbytes:
                counterpart = None
            for off, n in _ranges(start, t.nbytes):
                src = counterpart[0] + (off - start) if counterpart else 0
                before = _read(old, src, n) if counterpart else None
                w.changed(_read(new, off, n), before, src)
        pos = start + t.nbytes
    if ni.file_size > pos:
        w.data(_read(new, pos, ni.file_size - pos))


_GEAR = np.random.default_rng(0x5C1DECA8).integers(0, 2**32, size=256, dtype=np.uint64)


def _chunks(f: BinaryIO, size: int) -> Iterator[tuple[int, int]]:
    """Content-defined chunks: (offset, length). A boundary falls where the sum of the
    gear values of the last CDC_WINDOW bytes has its low bits zero, vectorised per piece."""
    start = 0
    carry = b""
    offset = 0
    while offset < size:
        block = _read(f, offset, PIECE)
        data = carry + block
        base = offset - len(carry)
        g = _GEAR[np.frombuffer(data, np.uint8)]
        c = np.cumsum(g, dtype=np.uint64)
        window = c[CDC_WINDOW:] - c[:-CDC_WINDOW] if len(c) > CDC_WINDOW else np.zeros(0, np.uint64)
        hits = np.nonzero((window & np.uint64(CDC_MASK)) == 0)[0] + CDC_WINDOW + base + 1
        for cut in hits.tolist():
            if cut <= start:
                continue
            while cut - start > CDC_MAX:
                yield start, CDC_MAX
                start += CDC_MAX
            if cut - start >= CDC_MIN:
                yield start, cut - start
                start = cut
        offset += len(block)
        carry = data[-CDC_WINDOW:]
    while size - start > CDC_MAX:
        yield start, CDC_MAX
        start += CDC_MAX
    if size > start:
        yield start, size - start


def _make_cdc(w: _Writer, old: BinaryIO, old_size: int, new: BinaryIO, new_size: int) -> None:
    index: dict[bytes, int] = {}
    for off, n in _chunks(old, old_size):
        index.setdefault(
            hashlib.blake2b(_read(old, off, n), digest_size=16).digest() + n.to_bytes(4, "little"),
            off,
        )
    for off, n in _chunks(new, new_size):
        raw = _read(new, off, n)
        key = hashlib.blake2b(raw, digest_size=16).digest() + n.to_bytes(4, "little")
        src = index.get(key)
        if src is not None:
            w.copy(src, n)
        else:
            w.data(raw)


def _parse(path: Path) -> GGUFInfo | None:
    try:
        return check(path)
    except (GGUFError, OSError, ValueError):
        return None


def make_delta(old: Path, new: Path, out: Path) -> DeltaInfo:
    oi, ni = _parse(old), _parse(new)
    mode = "gguf" if oi is not None and ni is not None else "cdc"
    header = {
        "base_sha256": sha256_of(old),
        "base_size": old.stat().st_size,
        "target_sha256": sha256_of(new),
        "target_size": new.stat().st_size,
        "mode": mode,
    }
    head = json.dumps(header, sort_keys=True).encode()
    partial = out.with_name(out.name + ".partial")
    with old.open("rb") as fo, new.open("rb") as fn, partial.open("wb") as fout:
        fout.write(MAGIC + struct.pack("<I", len(head)) + head)
        w = _Writer(fout)
        if oi is not None and ni is not None:
            _make_gguf(w, fo, fn, oi, ni)
        else:
            _make_cdc(w, fo, int(header["base_size"]), fn, int(header["target_size"]))  # type: ignore[call-overload]
        w.end()
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(partial, out)
    return DeltaInfo(
        str(header["base_sha256"]),
        int(header["base_size"]),  # type: ignore[call-overload]
        str(header["target_sha256"]),
        int(header["target_size"]),  # type: ignore[call-overload]
        w.payload,
        w.ops,
        mode,
    )


# ---------------------------------------------------------------- apply


def _header(f: BinaryIO) -> dict[str, object]:
    if f.read(len(MAGIC)) != MAGIC:
        raise DeltaError("not a sidecar delta (wrong magic)")
    raw = f.read(4)
    if len(raw) != 4:
        raise DeltaError("truncated delta header")
    (n,) = struct.unpack("<I", raw)
    if n > 1 << 16:
        raise DeltaError("corrupt delta header length")
    try:
        head = json.loads(f.read(n))
    except ValueError:
        raise DeltaError("corrupt delta header") from None
    for key in ("base_sha256", "base_size", "target_sha256", "target_size", "mode"):
        if key not in head:
            raise DeltaError(f"delta header lacks {key}")
    return dict(head)


def read_delta_info(delta: Path) -> DeltaInfo:
    with delta.open("rb") as f:
        h = _header(f)
        payload = delta.stat().st_size - f.tell()
    return DeltaInfo(str(h["base_sha256"]), int(h["base_size"]), str(h["target_sha256"]),  # type: ignore[call-overload]
                     int(h["target_size"]), payload, 0, str(h["mode"]))  # type: ignore[call-overload]  # fmt: skip


def _exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise DeltaError("truncated delta")
    return data


def apply_delta(
    old: Path,
    delta: Path,
    out: Path,
    *,
    progress: Callable[[int, int], None] | None = None,
    verify_base: bool = True,
) -> str:
    """Write the target to `out`; return its sha256. `verify_base=False` trusts the caller
    (the store names blobs by their sha256); the target's hash is checked either way."""
    zd = zstandard.ZstdDecompressor()
    with delta.open("rb") as fd:
        h = _header(fd)
        base_size, target_size = int(h["base_size"]), int(h["target_size"])  # type: ignore[call-overload]
        if old.stat().st_size != base_size:
            raise DeltaError(
                f"the base is {old.stat().st_size} bytes; this delta needs {base_size}"
            )
        if verify_base and sha256_of(old) != h["base_sha256"]:
            raise DeltaError("the base file is not the one this delta was made from")
        digest = hashlib.sha256()
        written = 0
        with old.open("rb") as fo, out.open("wb") as fout:

            def emit(data: bytes) -> None:
                nonlocal written
                if written + len(data) > target_size:
                    raise DeltaError("the delta writes past the target size")
                fout.write(data)
                digest.update(data)
                written += len(data)
                if progress is not None:
                    progress(written, target_size)

            def decompress(zlen: int, raw_len: int, d: zstandard.ZstdDecompressor = zd) -> bytes:
                if raw_len > PIECE or zlen > PIECE + (PIECE >> 4) + 1024:
                    raise DeltaError("corrupt delta: an op is larger than any op can be")
                try:
                    data = d.decompress(_exact(fd, zlen), max_output_size=raw_len)
                except zstandard.ZstdError as e:
                    raise DeltaError(f"corrupt delta payload: {e}") from None
                if len(data) != raw_len:
                    raise DeltaError("corrupt delta: a payload has the wrong length")
                return data

            def source(src: int, n: int) -> bytes:
                if src + n > base_size:
                    raise DeltaError("corrupt delta: reads past the end of the base")
                fo.seek(src)
                return _exact(fo, n)

            while True:
                kind = _exact(fd, 1)[0]
                if kind == END:
                    break
                if kind == COPY:
                    src, length = struct.unpack("<QQ", _exact(fd, 16))
                    for off, n in _ranges(src, length):
                        emit(source(off, n))
                elif kind == COPIES:
                    count, zlen = struct.unpack("<II", _exact(fd, 8))
                    if count > MAX_COPIES:
                        raise DeltaError("corrupt delta: too many copies in one op")
                    pairs = decompress(zlen, count * 16)
                    for src, length in struct.iter_unpack("<QQ", pairs):
                        for off, n in _ranges(src, length):
                            emit(source(off, n))
                elif kind == DATA:
                    raw_len, zlen = struct.unpack("<II", _exact(fd, 8))
                    emit(decompress(zlen, raw_len))
                elif kind == XOR:
                    src, raw_len, zlen = struct.unpack("<QII", _exact(fd, 16))
                    x = decompress(zlen, raw_len)
                    before = source(src, raw_len)
                    emit(
                        np.bitwise_xor(
                            np.frombuffer(x, np.uint8), np.frombuffer(before, np.uint8)
                        ).tobytes()
                    )
                elif kind == DICT:
                    doff, dlen, raw_len, zlen = struct.unpack("<QIII", _exact(fd, 20))
                    if dlen > MAX_DICT or raw_len > MAX_DICT:
                        raise DeltaError("corrupt delta: dictionary op too large")
                    dictionary = zstandard.ZstdCompressionDict(
                        source(doff, dlen), dict_type=zstandard.DICT_TYPE_RAWCONTENT
                    )
                    try:
                        data = zstandard.ZstdDecompressor(dict_data=dictionary).decompress(
                            _exact(fd, zlen), max_output_size=raw_len
                        )
                    except zstandard.ZstdError as e:
                        raise DeltaError(f"corrupt delta payload: {e}") from None
                    emit(data)
                else:
                    raise DeltaError(f"corrupt delta: unknown op {kind}")
            if fd.read(1):
                raise DeltaError("corrupt delta: bytes after the end")
            fout.flush()
            os.fsync(fout.fileno())
    if written != target_size:
        raise DeltaError(f"the delta produced {written} bytes; the target has {target_size}")
    got = digest.hexdigest()
    if got != h["target_sha256"]:
        raise DeltaError("the rebuilt file does not have the target's sha256")
    return got
