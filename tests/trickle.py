"""A real loopback HTTP origin that serves a folder (with Range) and can trickle.

`trickle` names path suffixes sent one byte per `interval` seconds (the body, or with
`slow_headers` the status line and headers too); everything else is sent at once.
`stall` sends the headers and then nothing at all. Requests are recorded as
(path, Range header) so a test can see a resume.
"""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path
from typing import Any


class _Handler(http.server.BaseHTTPRequestHandler):
    origin: TrickleOrigin

    def do_GET(self) -> None:
        o = self.origin
        rel = self.path.lstrip("/").split("?")[0]
        o.requests.append((rel, self.headers.get("Range", "")))
        file = o.root / rel
        if ".." in rel or not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        start = 0
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[len("bytes=") : -1])
        slow = any(rel.endswith(s) for s in o.trickle)
        head = (
            f"HTTP/1.1 {206 if start else 200} {'Partial Content' if start else 'OK'}\r\n"
            f"Content-Length: {len(data) - start}\r\n"
            + (f"Content-Range: bytes {start}-{len(data) - 1}/{len(data)}\r\n" if start else "")
            + "Connection: close\r\n\r\n"
        ).encode()
        try:
            if slow and o.slow_headers:
                self._drip(head)
            else:
                self.wfile.write(head)
                self.wfile.flush()
            if slow and o.stall:
                o.stopped.wait(120)
            elif slow:
                self._drip(data[start:])
            else:
                self.wfile.write(data[start:])
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True

    def _drip(self, data: bytes) -> None:
        for i in range(len(data)):
            if self.origin.stopped.is_set():
                return
            self.wfile.write(data[i : i + 1])
            self.wfile.flush()
            time.sleep(self.origin.interval)

    def log_message(self, *args: Any) -> None:
        pass


class TrickleOrigin:
    def __init__(self, root: Path, *, trickle: tuple[str, ...] = (), interval: float = 1.0,
                 slow_headers: bool = False, stall: bool = False) -> None:  # fmt: skip
        self.root = root
        self.trickle = trickle
        self.interval = interval
        self.slow_headers = slow_headers
        self.stall = stall
        self.requests: list[tuple[str, str]] = []
        self.stopped = threading.Event()
        handler = type("Handler", (_Handler,), {"origin": self})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def __enter__(self) -> TrickleOrigin:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.server.shutdown()
        self.server.server_close()
