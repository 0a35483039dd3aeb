"""Downloads from an update origin: resumable, bounded, verified.

The only state a download needs is its partial file: `fetch_file` continues from the
partial's length with an HTTP Range request, after a cut connection, a retry, or a
`kill -9` and restart of the daemon. It never writes past the size the signed manifest
declares (a server that sends more is refused; an endless response cannot fill the
disk), and the finished file must have the manifest's sha256. An origin is an http(s)
URL or a local folder (a mounted share), handled alike.

An origin can also be slow on purpose: one byte every few seconds keeps every socket
timeout happy. So a download has a total deadline and a floor on its rate (both in a
`Control`), and whoever started it can cancel it from another thread; either way the
partial file stays and the next attempt resumes it.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from sidecar.fileio import sha256_file
from sidecar.update.manifest import UpdateRejected

CHUNK = 1 << 20
USER_AGENT = "sidecar-updater/1"


class FetchError(Exception):
    """The origin could not be read (after retries); try again later."""


class Aborted(FetchError):
    """A download ended on purpose: past its deadline ("deadline"), or nobody waits for it
    any more ("cancelled"). Its partial file stays, so the next attempt resumes it."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Control:
    """One download's deadline, rate floor, cancel switch and progress (read by status).

    A read blocked in the kernel cannot be interrupted from Python, and a trickling origin
    never lets it time out. So `cancel` (from any thread, or the deadline's timer) marks the
    download ended and shuts down the socket it reads from: the blocked read returns at
    once, and the fetch raises `Aborted` instead of retrying.
    """

    def __init__(self, deadline_seconds: float | None = None, min_rate: int = 0) -> None:
        self.started = time.monotonic()
        self.deadline_seconds = deadline_seconds
        self.deadline = None if deadline_seconds is None else self.started + deadline_seconds
        self.min_rate = min_rate  # bytes/s over a timeout window; 0 = no floor
        self.what = ""
        self.done = 0
        self.total = 0
        self.last_byte = self.started
        self._why: Aborted | None = None
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._woken = threading.Event()

    @property
    def aborted(self) -> Aborted | None:
        return self._why

    def cancel(self, kind: str, message: str) -> None:
        with self._lock:
            if self._why is not None:
                return
            self._why = Aborted(kind, message)
            socks, self._socks = self._socks, []
        self._woken.set()
        for sock in socks:
            _shut(sock)

    def expire(self) -> None:
        took = f"{self.deadline_seconds:g}s" if self.deadline_seconds is not None else "its time"
        self.cancel(
            "deadline",
            f"{self.what or 'the download'} passed its deadline of {took} with {self.done} of "
            f"{self.total} bytes (update.fetch_deadline_seconds); the partial file is kept "
            "and the next apply resumes it",
        )

    def check(self) -> None:
        if self._why is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self.expire()
        if self._why is not None:
            raise self._why

    def sleep(self, seconds: float) -> None:
        self._woken.wait(seconds)
        self.check()

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            if self._why is None:
                self._socks.append(sock)
                return
        _shut(sock)  # cancelled while connecting

    def progress(self, done: int, total: int) -> None:
        if done > self.done:
            self.last_byte = time.monotonic()
        self.done, self.total = done, total

    @contextlib.contextmanager
    def running(self, what: str) -> Iterator[None]:
        """Arm the deadline's timer for one fetch (a blocked read is cut when it fires)."""
        self.what = what
        timer = None
        if self.deadline is not None:
            timer = threading.Timer(max(self.deadline - time.monotonic(), 0), self.expire)
            timer.daemon = True
            timer.start()
        try:
            self.check()
            yield
        finally:
            if timer is not None:
                timer.cancel()
            with self._lock:
                self._socks = []


def _shut(sock: socket.socket) -> None:
    # socket.socket's own shutdown even for TLS: it only wakes the reader, whose next read fails.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Tracked:
    """A urllib handler whose connections register their socket with a Control."""

    control: Control

    def do_open(self, http_class: Any, req: Any, **kw: Any) -> Any:
        control = self.control

        class Connection(http_class):  # type: ignore[misc]
            def connect(self) -> None:
                super().connect()
                control.attach(self.sock)

        return super().do_open(Connection, req, **kw)  # type: ignore[misc]


class _HTTP(_Tracked, urllib.request.HTTPHandler):
    pass


class _HTTPS(_Tracked, urllib.request.HTTPSHandler):
    pass


def origin_url(origin: str, rel: str) -> str:
    rel = rel.lstrip("/")
    if origin.startswith(("http://", "https://")):
        base = origin if origin.endswith("/") else origin + "/"
        return urllib.parse.urljoin(base, urllib.parse.quote(rel))
    folder = origin[len("file://") :] if origin.startswith("file://") else origin
    return str(Path(folder).expanduser() / rel)


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def _open(url: str, timeout: float, control: Control, start: int = 0) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if start:
        request.add_header("Range", f"bytes={start}-")
    handlers = []
    for kind in (_HTTP, _HTTPS):
        handler = kind()
        handler.control = control
        handlers.append(handler)
    response = urllib.request.build_opener(*handlers).open(request, timeout=timeout)
    assert isinstance(response, http.client.HTTPResponse)
    return response


def fetch_bytes(
    url: str, *, max_bytes: int, timeout: float = 30, control: Control | None = None
) -> bytes:
    """A small document (the manifest), refused past `max_bytes`."""
    control = control or Control()
    try:
        with control.running(url):
            if not _is_http(url):
                with open(url, "rb") as f:
                    data = f.read(max_bytes + 1)
            else:
                with _open(url, timeout, control) as r:
                    data = b""
                    # read1, not read: a trickling origin must come back here to be cut.
                    while len(data) <= max_bytes and (chunk := r.read1(max_bytes + 1 - len(data))):
                        data += chunk
                        control.progress(len(data), 0)  # its size is unknown
                        control.check()
    except FileNotFoundError:
        raise FetchError(f"{url}: not found") from None
    except urllib.error.HTTPError as e:
        raise FetchError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:
        control.check()  # a cut socket is the deadline's or a cancel's doing: say so
        raise FetchError(f"{url}: {e}") from None
    control.check()
    if len(data) > max_bytes:
        raise UpdateRejected("too_large", f"{url} is over the {max_bytes}-byte cap")
    return data


class Sink(Protocol):
    """How a download is kept on disk: as it comes (`PlainSink`), or sealed for an
    encrypted store (`sidecar.store.sealed.Resumable`, via `ModelStore.download_sink`)."""

    def have(self, path: Path) -> int:
        """Bytes of the download `path` already holds for certain (cut back to them)."""

    def writer(self, path: Path, start: int) -> AbstractContextManager[BinaryIO]:
        """A stream writing the download from byte `start` on; durable on exit."""


class PlainSink:
    def __init__(self, size: int) -> None:
        self.size = size

    def have(self, path: Path) -> int:
        have = path.stat().st_size if path.exists() else 0
        if have > self.size:  # not ours to trust (another origin's, or a bug): start over
            path.unlink()
            have = 0
        return have

    @contextlib.contextmanager
    def writer(self, path: Path, start: int) -> Iterator[BinaryIO]:
        if not path.exists():
            path.touch()
        with path.open("r+b") as out:
            out.seek(start)
            out.truncate()
            try:
                yield out
            finally:
                out.flush()
                os.fsync(out.fileno())  # what came stays: the next attempt resumes from it


def fetch_file(
    url: str,
    partial: Path,
    *,
    size: int,
    sha256: str,
    timeout: float = 30,
    retries: int = 5,
    backoff: float = 0.5,
    progress: Callable[[int, int], None] | None = None,
    control: Control | None = None,
    sink: Sink | None = None,
    digest_of: Callable[[Path], str] = sha256_file,
) -> None:
    """Bring `partial` to exactly `size` bytes with hash `sha256`, resuming what is there.

    `control` bounds the whole fetch, retries included (deadline, rate floor) and lets
    another thread cancel it; `Aborted` then leaves the partial file for the next try.
    `sink` keeps the bytes on disk (as they come by default; an encrypted store's seals
    them), `digest_of` hashes what the sink kept."""
    control = control or Control()
    sink = sink or PlainSink(size)
    partial.parent.mkdir(parents=True, exist_ok=True)
    attempt = 0
    with control.running(url):
        while True:
            have = sink.have(partial)
            control.progress(have, size)
            try:
                if have < size:
                    _transfer(url, partial, have, size, timeout, progress, control, sink)
                break
            except UpdateRejected:
                raise
            except _Retryable as e:
                control.check()  # ended on purpose, not by the origin: no retry
                attempt += 1
                if attempt > retries:
                    raise FetchError(f"{url}: {e} (gave up after {retries} retries)") from None
                # Jitter keeps a fleet that lost the origin at once from returning at once.
                control.sleep(backoff * (2 ** (attempt - 1)) * random.uniform(0.5, 1.5))
        control.check()
    digest = digest_of(partial)
    if digest != sha256:
        partial.unlink(missing_ok=True)  # resuming a wrong file would only stay wrong
        raise UpdateRejected(
            "hash", f"{url} has sha256 {digest[:12]}..., the manifest says {sha256[:12]}..."
        )


class _Retryable(Exception):
    pass


def _transfer(
    url: str,
    partial: Path,
    start: int,
    size: int,
    timeout: float,
    progress: Callable[[int, int], None] | None,
    control: Control,
    sink: Sink,
) -> None:
    if not _is_http(url):
        _copy_local(url, partial, start, size, progress, control, sink)
        return
    try:
        response = _open(url, timeout, control, start)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # nothing after `start`: the file is shorter than declared
            raise UpdateRejected("size", f"{url} is {start} bytes or shorter, not {size}") from None
        if e.code >= 500 or e.code == 429:
            raise _Retryable(f"HTTP {e.code} {e.reason}") from None
        raise FetchError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:
        raise _Retryable(str(e)) from None
    with response:
        if start and response.status != 206:  # the server ignored Range: begin again
            start = 0
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and start + int(declared) > size:
            raise UpdateRejected(
                "size", f"{url} is {start + int(declared)} bytes, the manifest says {size}"
            )
        with sink.writer(partial, start) as out:
            done = start
            window_start, window_done = time.monotonic(), done
            try:
                while True:
                    # Never ask for more than fits: one byte past `size` proves an overrun.
                    # read1 returns what one recv brings, so a trickle comes back here.
                    chunk = response.read1(min(CHUNK, size - done + 1))
                    if not chunk:
                        break
                    if done + len(chunk) > size:
                        raise UpdateRejected(
                            "size", f"{url} sends more than the {size} bytes the manifest says"
                        )
                    out.write(chunk)
                    done += len(chunk)
                    control.progress(done, size)
                    if progress is not None:
                        progress(done, size)
                    control.check()
                    now = time.monotonic()
                    if control.min_rate and now - window_start >= timeout:
                        rate = (done - window_done) / (now - window_start)
                        if rate < control.min_rate:
                            raise _Retryable(
                                f"the origin sends {rate:.0f} bytes/s, under the "
                                f"{control.min_rate} floor (update.fetch_min_bytes_per_second)"
                            )
                        window_start, window_done = now, done
            except (OSError, http.client.HTTPException, _Retryable) as e:
                # What came stays (the sink makes it durable): the next attempt resumes.
                raise _Retryable(f"cut after {done} of {size} bytes: {e}") from None
        if done < size:
            raise _Retryable(f"connection closed after {done} of {size} bytes")


def _copy_local(
    src: str,
    partial: Path,
    start: int,
    size: int,
    progress: Callable[[int, int], None] | None,
    control: Control,
    sink: Sink,
) -> None:
    try:
        actual = os.path.getsize(src)
    except OSError as e:
        raise FetchError(f"{src}: {e}") from None
    if actual > size:
        raise UpdateRejected("size", f"{src} is {actual} bytes, the manifest says {size}")
    if actual < size:
        raise UpdateRejected("size", f"{src} is {actual} bytes, the manifest says {size}")
    with open(src, "rb") as fin, sink.writer(partial, start) as out:
        fin.seek(start)
        done = start
        while chunk := fin.read(CHUNK):
            out.write(chunk)
            done += len(chunk)
            control.progress(done, size)
            if progress is not None:
                progress(done, size)
            control.check()  # a hung network mount is as slow as a trickling server
