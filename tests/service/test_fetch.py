"""Resumable, bounded downloads against a real nginx (and two misbehaving tiny servers)."""

from __future__ import annotations

import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nginx import NGINX, Nginx

from sidecar.update.fetch import FetchError, fetch_bytes, fetch_file, origin_url
from sidecar.update.manifest import UpdateRejected

pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (scripts/setup installs it as root)"
)

SIZE = 3 * 1024 * 1024


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, str]:
    root = tmp_path / "www"
    root.mkdir()
    data = os.urandom(SIZE)
    (root / "blob.bin").write_bytes(data)
    return root, hashlib.sha256(data).hexdigest()


@pytest.fixture
def nginx(blob: tuple[Path, str], tmp_path: Path) -> Iterator[Nginx]:
    n = Nginx(blob[0], tmp_path / "nginx").start()
    yield n
    n.stop()


def test_full_download_verifies_size_and_hash(nginx: Nginx, blob, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    part = tmp_path / "dl" / "blob.partial"
    seen: list[int] = []
    fetch_file(origin_url(nginx.base_url, "blob.bin"), part, size=SIZE, sha256=blob[1],
               progress=lambda done, total: seen.append(done))  # fmt: skip
    assert part.stat().st_size == SIZE and seen[-1] == SIZE


def test_a_cut_transfer_resumes_with_a_range_request(blob, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    slow = Nginx(blob[0], tmp_path / "slow", limit_rate="2m").start()
    part = tmp_path / "blob.partial"
    url = origin_url(slow.base_url, "blob.bin")
    errors: list[BaseException] = []

    def first() -> None:
        try:
            fetch_file(url, part, size=SIZE, sha256=blob[1], retries=0)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=first)
    t.start()
    while not part.exists() or part.stat().st_size < 512 * 1024:
        time.sleep(0.02)
    slow.stop()  # the origin goes away mid-transfer
    t.join(10)
    assert errors and isinstance(errors[0], FetchError)
    have = part.stat().st_size
    assert 0 < have < SIZE
    fast = Nginx(blob[0], tmp_path / "fast")
    fast.port = slow.port  # the same origin comes back
    fast.start()
    try:
        fetch_file(url, part, size=SIZE, sha256=blob[1])
    finally:
        fast.stop()
    log = fast.access_log()
    assert len(log) == 1 and '" 206 ' in log[0], log
    sent = int(log[0].split('" 206 ')[1].split()[0])
    assert sent == SIZE - have  # only the rest travelled


def test_kill_9_mid_download_then_a_new_process_resumes(blob, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    slow = Nginx(blob[0], tmp_path / "slow", limit_rate="1m").start()
    part = tmp_path / "blob.partial"
    url = origin_url(slow.base_url, "blob.bin")
    code = (
        "import sys; from pathlib import Path; from sidecar.update.fetch import fetch_file; "
        f"fetch_file({url!r}, Path({str(part)!r}), size={SIZE}, sha256={blob[1]!r})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    while not part.exists() or part.stat().st_size < 256 * 1024:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    have = part.stat().st_size
    assert have < SIZE
    slow.stop()
    fast = Nginx(blob[0], tmp_path / "fast")
    fast.port = slow.port
    fast.start()
    try:
        fetch_file(url, part, size=SIZE, sha256=blob[1])
    finally:
        fast.stop()
    assert part.stat().st_size == SIZE
    assert any('" 206 ' in line for line in fast.access_log())


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b""
    endless = False

    def do_GET(self) -> None:
        self.send_response(200)  # ignores Range on purpose
        if not self.endless:
            self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        try:
            if self.endless:
                while True:
                    self.wfile.write(b"\0" * 65536)
            else:
                self.wfile.write(self.body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def tiny_server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("H", (_Handler,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/x", handler
    server.shutdown()
    server.server_close()


def test_a_server_that_ignores_range_restarts_cleanly(tiny_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, handler = tiny_server
    handler.body = os.urandom(200_000)
    part = tmp_path / "p.partial"
    part.write_bytes(handler.body[:50_000][::-1])  # a stale, wrong partial
    fetch_file(url, part, size=200_000, sha256=hashlib.sha256(handler.body).hexdigest())
    assert part.read_bytes() == handler.body


def test_an_endless_response_stops_at_the_declared_size(tiny_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, handler = tiny_server
    handler.endless = True
    part = tmp_path / "p.partial"
    with pytest.raises(UpdateRejected) as e:
        fetch_file(url, part, size=100_000, sha256="0" * 64)
    assert e.value.reason == "size"
    assert part.stat().st_size <= 100_000


def test_a_longer_blob_is_refused_by_its_length(tiny_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, handler = tiny_server
    handler.body = b"x" * 5000
    with pytest.raises(UpdateRejected) as e:
        fetch_file(url, tmp_path / "p.partial", size=4000, sha256="0" * 64)
    assert e.value.reason == "size"


def test_a_wrong_hash_is_refused_and_the_partial_removed(nginx: Nginx, tmp_path: Path) -> None:
    part = tmp_path / "p.partial"
    with pytest.raises(UpdateRejected) as e:
        fetch_file(origin_url(nginx.base_url, "blob.bin"), part, size=SIZE, sha256="0" * 64)
    assert e.value.reason == "hash" and not part.exists()


def test_404_fails_at_once_and_refused_connections_are_retried(
    nginx: Nginx, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="404"):
        fetch_file(origin_url(nginx.base_url, "nope"), tmp_path / "p", size=1, sha256="0" * 64,
                   retries=3, backoff=1)  # fmt: skip
    assert time.monotonic() - t0 < 1  # no retries for a 404
    nginx.stop()
    with pytest.raises(FetchError, match="gave up after 2 retries"):
        fetch_file(origin_url(nginx.base_url, "blob.bin"), tmp_path / "p", size=1,
                   sha256="0" * 64, retries=2, backoff=0.01)  # fmt: skip


def test_manifest_fetch_is_capped(nginx: Nginx) -> None:
    with pytest.raises(UpdateRejected) as e:
        fetch_bytes(origin_url(nginx.base_url, "blob.bin"), max_bytes=1000)
    assert e.value.reason == "too_large"


def test_a_local_folder_origin_copies_and_resumes(blob, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, sha = blob
    part = tmp_path / "p.partial"
    part.write_bytes((root / "blob.bin").read_bytes()[:1000])
    fetch_file(origin_url(str(root), "blob.bin"), part, size=SIZE, sha256=sha)
    assert part.read_bytes() == (root / "blob.bin").read_bytes()
