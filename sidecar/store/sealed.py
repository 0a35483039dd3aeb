"""The encrypted blob format: AES-256-GCM in fixed-size authenticated chunks.

    header (32 bytes)  b"SCSEALED"  u16 format  8 bytes key id  u32 chunk size
                       8 bytes random nonce prefix  u16 reserved (0)
    chunk*             AES-GCM(plaintext[i*chunk:(i+1)*chunk]) + 16-byte tag

Chunk i is sealed with the nonce prefix || u32 i and, as associated data, the whole
header || u64 i || u8 final (1 on the last chunk only; an empty file has one empty final
chunk). So a chunk moved, swapped in from another blob, or a file cut at a chunk boundary
fails authentication like a flipped byte does: nothing unauthenticated is ever returned.
The key id (a digest of the key, not the key) lets a blob say which key it needs, so a
rekey can leave a mix of old-key and new-key blobs and both stay readable.

Reading is random access (a GGUF header check seeks), one chunk in memory at a time;
writing holds one chunk. The plaintext's sha256 stays the blob's name: encryption does not
change what a version is.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecar.domain.errors import FailedPrecondition

MAGIC = b"SCSEALED"
FORMAT = 1
CHUNK = 1 << 20
TAG = 16
KEY_BYTES = 32
_HEADER = struct.Struct("<8sH8sI8sH")
HEADER_SIZE = _HEADER.size  # 32
_AD_TAIL = struct.Struct("<QB")


class SealError(FailedPrecondition):
    """A sealed blob cannot be read: no key for it, or its bytes are damaged or altered."""


class MissingKey(SealError):
    """The blob needs a key this process was not given."""


class Damaged(SealError):
    """The blob failed authentication or is truncated."""


def key_id(key: bytes) -> str:
    """A short public name of a key: 16 hex digits of a domain-separated sha256."""
    return hashlib.sha256(b"sidecar store key id\0" + key).hexdigest()[:16]


def is_sealed(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def needed_key(path: Path) -> str:
    """The key id a sealed file's header names."""
    with path.open("rb") as f:
        return _parse_header(f.read(HEADER_SIZE), path)[1]


def _parse_header(raw: bytes, where: object) -> tuple[int, str, int, bytes]:
    if len(raw) < HEADER_SIZE or not raw.startswith(MAGIC):
        raise Damaged(f"{where}: not a sealed blob (its header is missing or cut short)")
    _, fmt, kid, chunk, prefix, _ = _HEADER.unpack(raw[:HEADER_SIZE])
    if fmt != FORMAT:
        raise Damaged(f"{where}: sealed blob format {fmt} is not supported (this is {FORMAT})")
    if not 0 < chunk <= 64 << 20:
        raise Damaged(f"{where}: corrupt header (chunk size {chunk})")
    return fmt, kid.hex(), chunk, prefix


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack("<I", index)


class SealWriter(io.RawIOBase):
    """Seals what is written to `out` (a binary file opened for writing at its start).
    `close()` writes the final chunk; the caller fsyncs and closes `out`."""

    def __init__(self, out: BinaryIO, key: bytes, chunk: int = CHUNK) -> None:
        super().__init__()
        self._out = out
        self._aead = AESGCM(key)
        self._chunk = chunk
        prefix = os.urandom(8)
        self._header = _HEADER.pack(MAGIC, FORMAT, bytes.fromhex(key_id(key)), chunk, prefix, 0)
        self._prefix = prefix
        self._buf = bytearray()
        self._index = 0
        out.write(self._header)

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._buf += data
        while len(self._buf) > self._chunk:  # keep one: the last chunk is sealed as final
            self._seal(bytes(self._buf[: self._chunk]), final=False)
            del self._buf[: self._chunk]
        return len(data)

    def _seal(self, plain: bytes, final: bool) -> None:
        if self._index >= 1 << 32:
            raise ValueError("a sealed blob holds at most 2**32 chunks")
        ad = self._header + _AD_TAIL.pack(self._index, final)
        self._out.write(self._aead.encrypt(_nonce(self._prefix, self._index), plain, ad))
        self._index += 1

    def close(self) -> None:
        if not self.closed:
            self._seal(bytes(self._buf), final=True)
            self._buf = bytearray()
        super().close()


class SealedReader(io.RawIOBase):
    """The plaintext of a sealed file, random access, one authenticated chunk at a time.
    Any chunk that fails authentication raises `Damaged`; nothing of it is returned."""

    def __init__(self, f: BinaryIO, keys: Mapping[str, bytes], where: object) -> None:
        super().__init__()
        self._f = f
        self._where = where
        raw = f.read(HEADER_SIZE)
        _, kid, self._chunk, self._prefix = _parse_header(raw, where)
        self._header = raw[:HEADER_SIZE]
        key = keys.get(kid)
        if key is None:
            have = ", ".join(sorted(keys)) or "none"
            raise MissingKey(
                f"{where} is sealed with key {kid}, which this daemon was not given "
                f"(keys it has: {have}): configure that key (store.key_file, "
                "store.previous_key_file, the systemd credential or SIDECAR_STORE_KEY)"
            )
        self.key_id = kid
        self._aead = AESGCM(key)
        body = os.fstat(f.fileno()).st_size - HEADER_SIZE
        step = self._chunk + TAG
        full, rest = divmod(body, step)
        if (rest and rest < TAG) or body < TAG:
            raise Damaged(
                f"{where}: truncated ({body + HEADER_SIZE} bytes ends inside a chunk tag)"
            )
        self._chunks = full + (1 if rest else 0)
        self.size = full * self._chunk + (rest - TAG if rest else 0)
        self._pos = 0
        self._cached: tuple[int, bytes] | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _plain(self, index: int) -> bytes:
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        step = self._chunk + TAG
        self._f.seek(HEADER_SIZE + index * step)
        sealed = self._f.read(step)
        final = index == self._chunks - 1
        ad = self._header + _AD_TAIL.pack(index, final)
        try:
            plain = self._aead.decrypt(_nonce(self._prefix, index), sealed, ad)
        except InvalidTag:
            raise Damaged(
                f"{self._where}: chunk {index} of {self._chunks} failed authentication "
                "(the blob is damaged, truncated or was altered)"
            ) from None
        self._cached = (index, plain)
        return plain

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._pos >= self.size:
            # The final chunk carries the "final" flag: read it once so that a file cut at
            # a chunk boundary is noticed by a reader that stops at the size it computed.
            if self._chunks and self._pos == self.size:
                self._plain(self._chunks - 1)
            return 0
        index, within = divmod(self._pos, self._chunk)
        plain = self._plain(index)
        n = min(len(buffer), len(plain) - within)
        buffer[:n] = plain[within : within + n]
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(self.size - self._pos, 0)
        out = bytearray()
        while len(out) < size:
            chunk = bytearray(min(size - len(out), self._chunk))
            n = self.readinto(chunk)
            if not n:
                break
            out += chunk[:n]
        return bytes(out)

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a sealed reader has no plaintext descriptor")

    def close(self) -> None:
        if not self.closed:
            self._f.close()
            self._cached = None
        super().close()


def open_sealed(path: Path, keys: Mapping[str, bytes]) -> SealedReader:
    f = path.open("rb")
    try:
        return SealedReader(f, keys, path)
    except BaseException:
        f.close()
        raise


def seal_stream(src: BinaryIO, out: BinaryIO, key: bytes, chunk: int = CHUNK) -> str:
    """Seal all of `src` into `out`; return the plaintext's sha256."""
    h = hashlib.sha256()
    w = SealWriter(out, key, chunk)
    while block := src.read(chunk):
        h.update(block)
        w.write(block)
    w.close()
    return h.hexdigest()


def sealed_size(plain: int, chunk: int = CHUNK) -> int:
    """Bytes of a complete sealed file holding `plain` bytes."""
    full, rest = divmod(plain, chunk)
    chunks = full + (1 if rest or not full else 0)
    return HEADER_SIZE + plain + chunks * TAG


class Resumable:
    """A sealed file written across interruptions (a download that resumes), of a known
    plaintext size `total`: only whole chunks are ever kept, the last one sealed as final
    once `total` bytes have come, so after a crash the file holds a prefix of whole
    authenticated chunks and the download resumes after them."""

    def __init__(self, key: bytes, total: int, chunk: int = CHUNK) -> None:
        self.key, self.total, self.chunk = key, total, chunk

    def have(self, path: Path) -> int:
        """Plaintext bytes `path` holds for certain (the file cut back to them)."""
        try:
            size = path.stat().st_size
            with path.open("rb") as f:
                _, kid, chunk, _ = _parse_header(f.read(HEADER_SIZE), path)
        except (OSError, SealError):
            path.unlink(missing_ok=True)
            return 0
        if kid != key_id(self.key) or chunk != self.chunk:
            path.unlink()  # another key's or another layout's: start over
            return 0
        if size == sealed_size(self.total, chunk):
            return self.total
        whole, torn = divmod(size - HEADER_SIZE, chunk + TAG)
        if torn or whole > max(self.total - 1, 0) // chunk:
            # Only a crash inside a chunk's write (or a file not of this download) leaves
            # this: that chunk's nonce may already have sealed bytes on disk, and the
            # origin need not send the same bytes again. Resealing it under the same
            # nonce could give away both plaintexts (and GCM's authentication key), so
            # start over with a fresh nonce prefix instead; a cut connection never
            # gets here (only whole chunks are ever written).
            path.unlink()
            return 0
        with path.open("r+b") as f:
            f.truncate(HEADER_SIZE + whole * (chunk + TAG))
            f.flush()
            os.fsync(f.fileno())
        return whole * chunk

    @contextlib.contextmanager
    def writer(self, path: Path, start: int) -> Iterator[BinaryIO]:
        """A stream that seals what is written at plaintext offset `start` (0, or what
        `have` said); durable on exit, the final chunk sealed only once all has come."""
        if start % self.chunk:
            raise ValueError("a sealed download resumes at a chunk boundary only")
        if start == 0:
            with path.open("wb") as f:
                prefix = os.urandom(8)
                header = _HEADER.pack(
                    MAGIC, FORMAT, bytes.fromhex(key_id(self.key)), self.chunk, prefix, 0
                )
                f.write(header)
        with path.open("r+b") as f:
            header = f.read(HEADER_SIZE)
            prefix = header[22:30]
            f.seek(HEADER_SIZE + (start // self.chunk) * (self.chunk + TAG))
            f.truncate()
            w = _ChunkSink(f, AESGCM(self.key), header, prefix, start // self.chunk, self)
            try:
                yield w  # type: ignore[misc]
            finally:
                w.finish(start)
                f.flush()
                os.fsync(f.fileno())


class _ChunkSink(io.RawIOBase):
    def __init__(
        self, f: BinaryIO, aead: AESGCM, header: bytes, prefix: bytes, index: int, r: Resumable
    ) -> None:
        super().__init__()
        self._f, self._aead, self._header, self._prefix = f, aead, header, prefix
        self._index, self._r = index, r
        self._buf = bytearray()
        self.written = 0

    def writable(self) -> bool:
        return True

    def _seal(self, plain: bytes) -> None:
        end = self._index * self._r.chunk + len(plain)
        final = end >= self._r.total
        ad = self._header + _AD_TAIL.pack(self._index, final)
        self._f.write(self._aead.encrypt(_nonce(self._prefix, self._index), plain, ad))
        self._index += 1

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._buf += data
        self.written += len(data)
        while len(self._buf) >= self._r.chunk:
            self._seal(bytes(self._buf[: self._r.chunk]))
            del self._buf[: self._r.chunk]
        return len(data)

    def finish(self, start: int) -> None:
        """The last, short chunk once everything has come (or the one empty chunk of an
        empty file); a short tail of an unfinished download is dropped, fetched again."""
        if start + self.written == self._r.total and (self._buf or self._r.total == 0):
            self._seal(bytes(self._buf))
        self._buf = bytearray()
