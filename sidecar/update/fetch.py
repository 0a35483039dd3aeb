"""Downloads from an update origin: resumable, bounded, verified.

The only state a download needs is its partial file: `fetch_file` continues from the
partial's length with an HTTP Range request, after a cut connection, a retry, or a
`kill -9` and restart of the daemon. It never writes past the size the signed manifest
declares (a server that sends more is refused; an endless response cannot fill the
disk), and the finished file must have the manifest's sha256. An origin is an http(s)
URL or a local folder (a mounted share), handled alike.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from sidecar.update.manifest import UpdateRejected

CHUNK = 1 << 20
USER_AGENT = "sidecar-updater/1"


class FetchError(Exception):
    """The origin could not be read (after retries); try again later."""


def origin_url(origin: str, rel: str) -> str:
    rel = rel.lstrip("/")
    if origin.startswith(("http://", "https://")):
        base = origin if origin.endswith("/") else origin + "/"
        return urllib.parse.urljoin(base, urllib.parse.quote(rel))
    folder = origin[len("file://") :] if origin.startswith("file://") else origin
    return str(Path(folder).expanduser() / rel)


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def _open(url: str, timeout: float, start: int = 0) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if start:
        request.add_header("Range", f"bytes={start}-")
    response = urllib.request.urlopen(request, timeout=timeout)
    assert isinstance(response, http.client.HTTPResponse)
    return response


def fetch_bytes(url: str, *, max_bytes: int, timeout: float = 30) -> bytes:
    """A small document (the manifest), refused past `max_bytes`."""
    try:
        if not _is_http(url):
            with open(url, "rb") as f:
                data = f.read(max_bytes + 1)
        else:
            with _open(url, timeout) as r:
                data = r.read(max_bytes + 1)
    except FileNotFoundError:
        raise FetchError(f"{url}: not found") from None
    except urllib.error.HTTPError as e:
        raise FetchError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:
        raise FetchError(f"{url}: {e}") from None
    if len(data) > max_bytes:
        raise UpdateRejected("too_large", f"{url} is over the {max_bytes}-byte cap")
    return data


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
) -> None:
    """Bring `partial` to exactly `size` bytes with hash `sha256`, resuming what is there."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    attempt = 0
    while True:
        have = partial.stat().st_size if partial.exists() else 0
        if have > size:  # not ours to trust (another origin's, or a bug): start over
            partial.unlink()
            have = 0
        try:
            if have < size:
                _transfer(url, partial, have, size, timeout, progress)
            break
        except UpdateRejected:
            raise
        except _Retryable as e:
            attempt += 1
            if attempt > retries:
                raise FetchError(f"{url}: {e} (gave up after {retries} retries)") from None
            # Jitter keeps a fleet that lost the origin at once from returning at once.
            time.sleep(backoff * (2 ** (attempt - 1)) * random.uniform(0.5, 1.5))
    digest = _sha256(partial)
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
) -> None:
    if not _is_http(url):
        _copy_local(url, partial, start, size, progress)
        return
    try:
        response = _open(url, timeout, start)
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
        mode = "r+b" if start else "wb"
        if not partial.exists():
            partial.touch()
        with partial.open(mode) as out:
            out.seek(start)
            out.truncate()
            done = start
            try:
                while True:
                    # Never ask for more than fits: one byte past `size` proves an overrun.
                    chunk = response.read(min(CHUNK, size - done + 1))
                    if not chunk:
                        break
                    if done + len(chunk) > size:
                        raise UpdateRejected(
                            "size", f"{url} sends more than the {size} bytes the manifest says"
                        )
                    out.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, size)
            except (OSError, http.client.HTTPException) as e:
                out.flush()
                os.fsync(out.fileno())
                raise _Retryable(f"cut after {done} of {size} bytes: {e}") from None
            out.flush()
            os.fsync(out.fileno())
        if done < size:
            raise _Retryable(f"connection closed after {done} of {size} bytes")


def _copy_local(
    src: str, partial: Path, start: int, size: int, progress: Callable[[int, int], None] | None
) -> None:
    try:
        actual = os.path.getsize(src)
    except OSError as e:
        raise FetchError(f"{src}: {e}") from None
    if actual > size:
        raise UpdateRejected("size", f"{src} is {actual} bytes, the manifest says {size}")
    if actual < size:
        raise UpdateRejected("size", f"{src} is {actual} bytes, the manifest says {size}")
    with open(src, "rb") as fin, partial.open("r+b" if start else "wb") as out:
        fin.seek(start)
        out.seek(start)
        out.truncate()
        done = start
        while chunk := fin.read(CHUNK):
            out.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, size)
        out.flush()
        os.fsync(out.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
