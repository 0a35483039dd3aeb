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

import contextlib
import hashlib
import io
import json
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import zstandard

from sidecar.fileio import sha256_file, sha256_stream
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
        "base_sha256": sha256_file(old),
        "base_size": old.stat().st_size,
        "target_sha256": sha256_file(new),
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
#
# Whoever holds the publisher's key (or a careless publisher) chooses every byte of a
# delta, signed or not. So nothing in it sizes an allocation or a write: the caller
# passes the target size from the signed manifest and not a byte past it is written; a
# zstd frame is read through a bounded stream (its declared content size would otherwise
# be allocated whole); each op is checked against the room left before it runs; and any
# malformed delta, down to a wrong type in its header, is a DeltaError, so the updater
# falls back to the full file.

MAX_WINDOW = 1 << 25  # zstd window an op may ask for; ours use at most 8 MiB (level 12)
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class _Head:
    base_sha256: str
    base_size: int
    target_sha256: str
    target_size: int
    mode: str


def _header(f: BinaryIO) -> _Head:
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
    except (ValueError, RecursionError):  # RecursionError: 64 KiB of "[" is valid input
        raise DeltaError("corrupt delta header") from None
    if not isinstance(head, dict):
        raise DeltaError("corrupt delta header: not a JSON object")
    for key in ("base_sha256", "base_size", "target_sha256", "target_size", "mode"):
        if key not in head:
            raise DeltaError(f"delta header lacks {key}")
    for key in ("base_sha256", "target_sha256"):
        v = head[key]
        if not isinstance(v, str) or len(v) != 64 or not set(v) <= _HEX:
            raise DeltaError(f"corrupt delta header: {key} must be 64 lowercase hex digits")
    for key in ("base_size", "target_size"):
        v = head[key]
        if type(v) is not int or v < 0:
            raise DeltaError(
                f"corrupt delta header: {key} must be a non-negative integer, "
                f"got {type(v).__name__}"
            )
    if not isinstance(head["mode"], str):
        raise DeltaError("corrupt delta header: mode must be a string")
    return _Head(head["base_sha256"], head["base_size"], head["target_sha256"],
                 head["target_size"], head["mode"])  # fmt: skip


def read_delta_info(delta: Path, opener: Opener | None = None) -> DeltaInfo:
    with (opener or _read_file)(delta) as f:
        h = _header(f)
        start = f.tell()
        payload = f.seek(0, io.SEEK_END) - start  # the stream's: a sealed file is longer
    return DeltaInfo(h.base_sha256, h.base_size, h.target_sha256, h.target_size, payload, 0,
                     h.mode)  # fmt: skip


def _exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise DeltaError("truncated delta")
    return data


def _inflate(d: zstandard.ZstdDecompressor, payload: bytes, raw_len: int) -> bytes:
    """Exactly `raw_len` bytes out of one zstd frame, holding at most one byte more.

    `ZstdDecompressor.decompress` allocates the size the frame declares, whatever
    `max_output_size` says: 32 KiB declaring 1 GiB cost 1 GiB. A stream read is bounded
    by what we ask for."""
    out = bytearray()
    try:
        with d.stream_reader(io.BytesIO(payload), read_across_frames=False) as r:
            while len(out) <= raw_len:
                chunk = r.read(raw_len + 1 - len(out))
                if not chunk:
                    break
                out += chunk
    except zstandard.ZstdError as e:
        raise DeltaError(f"corrupt delta payload: {e}") from None
    if len(out) != raw_len:
        more = "more" if len(out) > raw_len else f"{len(out)}"
        raise DeltaError(f"corrupt delta: a payload holds {more} bytes, its op says {raw_len}")
    return bytes(out)


Opener = Callable[[Path], AbstractContextManager[BinaryIO]]


@contextlib.contextmanager
def _read_file(path: Path) -> Iterator[BinaryIO]:
    with path.open("rb") as f:
        yield f


@contextlib.contextmanager
def _write_file(path: Path) -> Iterator[BinaryIO]:
    with path.open("wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def apply_delta(
    old: Path,
    delta: Path,
    out: Path,
    *,
    progress: Callable[[int, int], None] | None = None,
    verify_base: bool = True,
    target_size: int | None = None,
    max_size: int | None = None,
    read_old: Opener | None = None,
    read_delta: Opener | None = None,
    write_out: Opener | None = None,
) -> str:
    """Write the target to `out`; return its sha256. `verify_base=False` trusts the caller
    (the store names blobs by their sha256); the target's hash is checked either way.

    `target_size` is the size a trusted source (the signed manifest) declares: the delta
    must declare the same, and nothing past it is written. Without it, `max_size` (when
    given) caps what the delta's own claim may be. `read_old`, `read_delta` / `write_out`
    open the base, the delta and the target (an encrypted store's: through decryption and
    encryption, so none is on disk in plaintext); `write_out`'s stream is made durable
    when it closes."""
    with (read_delta or _read_file)(delta) as fd:
        h = _header(fd)
        if target_size is not None and h.target_size != target_size:
            raise DeltaError(
                f"the delta declares a {h.target_size}-byte target; the manifest says {target_size}"
            )
        if max_size is not None and h.target_size > max_size:
            raise DeltaError(
                f"the delta declares a {h.target_size}-byte target, over the {max_size}-byte "
                "cap for this step"
            )
        limit = h.target_size
        with (read_old or _read_file)(old) as fo:
            size_now = fo.seek(0, io.SEEK_END)
            fo.seek(0)
            if size_now != h.base_size:
                raise DeltaError(f"the base is {size_now} bytes; this delta needs {h.base_size}")
            if verify_base and _sha256(fo) != h.base_sha256:
                raise DeltaError("the base file is not the one this delta was made from")
            digest = hashlib.sha256()
            with (write_out or _write_file)(out) as fout:
                try:
                    written = _run_ops(fd, fo, fout, h.base_size, limit, digest, progress)
                except (ValueError, TypeError, OverflowError, struct.error) as e:
                    # A hostile op that got past the checks below still only means "corrupt".
                    raise DeltaError(f"corrupt delta: {e}") from None
    if written != limit:
        raise DeltaError(f"the delta produced {written} bytes; the target has {limit}")
    got = digest.hexdigest()
    if got != h.target_sha256:
        raise DeltaError("the rebuilt file does not have the target's sha256")
    return got


def _sha256(f: BinaryIO) -> str:
    f.seek(0)
    got = sha256_stream(f, PIECE)
    f.seek(0)
    return got


def _run_ops(
    fd: BinaryIO,
    fo: BinaryIO,
    fout: BinaryIO,
    base_size: int,
    limit: int,
    digest: Any,
    progress: Callable[[int, int], None] | None,
) -> int:
    """Apply every op of `fd` to `fout`; return the bytes written (never more than `limit`)."""
    zd = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
    written = 0

    def room(n: int, what: str) -> None:
        # Before an op runs, not after: a 2^63-byte COPY must not start at all.
        if written + n > limit:
            raise DeltaError(
                f"corrupt delta: a {what} of {n} bytes at {written} runs past the "
                f"{limit}-byte target"
            )

    def emit(data: bytes) -> None:
        nonlocal written
        room(len(data), "write")
        fout.write(data)
        digest.update(data)
        written += len(data)
        if progress is not None:
            progress(written, limit)

    def payload(zlen: int, raw_len: int, d: zstandard.ZstdDecompressor = zd) -> bytes:
        if raw_len > PIECE or zlen > PIECE + (PIECE >> 4) + 1024:
            raise DeltaError("corrupt delta: an op is larger than any op can be")
        return _inflate(d, _exact(fd, zlen), raw_len)

    def source(src: int, n: int) -> bytes:
        if src + n > base_size:
            raise DeltaError("corrupt delta: reads past the end of the base")
        fo.seek(src)
        return _exact(fo, n)

    def copy(src: int, length: int) -> None:
        room(length, "copy")
        if src + length > base_size:
            raise DeltaError("corrupt delta: reads past the end of the base")
        for off, n in _ranges(src, length):
            emit(source(off, n))

    while True:
        kind = _exact(fd, 1)[0]
        if kind == END:
            break
        if kind == COPY:
            copy(*struct.unpack("<QQ", _exact(fd, 16)))
        elif kind == COPIES:
            count, zlen = struct.unpack("<II", _exact(fd, 8))
            if count > MAX_COPIES:
                raise DeltaError("corrupt delta: too many copies in one op")
            for src, length in struct.iter_unpack("<QQ", payload(zlen, count * 16)):
                copy(src, length)
        elif kind == DATA:
            raw_len, zlen = struct.unpack("<II", _exact(fd, 8))
            room(raw_len, "data op")
            emit(payload(zlen, raw_len))
        elif kind == XOR:
            src, raw_len, zlen = struct.unpack("<QII", _exact(fd, 16))
            room(raw_len, "xor op")
            x = payload(zlen, raw_len)
            before = source(src, raw_len)
            emit(
                np.bitwise_xor(
                    np.frombuffer(x, np.uint8), np.frombuffer(before, np.uint8)
                ).tobytes()
            )
        elif kind == DICT:
            doff, dlen, raw_len, zlen = struct.unpack("<QIII", _exact(fd, 20))
            if dlen > MAX_DICT or raw_len > MAX_DICT or zlen > MAX_DICT + (MAX_DICT >> 4):
                raise DeltaError("corrupt delta: dictionary op too large")
            room(raw_len, "dictionary op")
            dictionary = zstandard.ZstdCompressionDict(
                source(doff, dlen), dict_type=zstandard.DICT_TYPE_RAWCONTENT
            )
            dd = zstandard.ZstdDecompressor(dict_data=dictionary, max_window_size=MAX_WINDOW)
            emit(_inflate(dd, _exact(fd, zlen), raw_len))
        else:
            raise DeltaError(f"corrupt delta: unknown op {kind}")
    if fd.read(1):
        raise DeltaError("corrupt delta: bytes after the end")
    return written
