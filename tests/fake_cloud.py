"""A scripted OpenAI-compatible cloud on loopback: a real HTTP server that replies what a
test queues (good or slow answers, 429/5xx, malformed bodies, hangs) and records every byte it
receives, so tests can prove what never left the machine."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Script:
    def __init__(self) -> None:
        self.replies: list[tuple[str, Any]] = []
        self.default: tuple[str, Any] = ok("default")
        self.delay = 0.0  # seconds every reply waits before it is sent (calls overlap)
        self.received: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.raw = bytearray()  # every byte received, headers included

    def seen(self, needle: str) -> bool:
        return needle.encode() in self.raw


def ok(content: str, prompt: int = 10, completion: int = 2) -> tuple[str, Any]:
    return ("json", {
        "id": "x", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion},
    })  # fmt: skip


@contextmanager
def _serve(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A threaded HTTP server on a free loopback port; yields its /v1 base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def fake_cloud() -> Iterator[tuple[str, Script]]:
    script = Script()
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with lock:
                script.raw += self.requestline.encode() + b"\r\n" + bytes(self.headers) + body
                script.received.append(json.loads(body))
                script.headers.append({k.lower(): v for k, v in self.headers.items()})
                kind, arg = script.replies.pop(0) if script.replies else script.default
            time.sleep(script.delay)
            try:
                if kind == "hang":
                    time.sleep(arg)
                    return
                if kind == "status":
                    self._send(arg, b'{"error": {"message": "injected", "type": "x"}}')
                elif kind == "raw_status":
                    self._send(*arg)
                elif kind == "raw":
                    self._send(200, arg)
                else:
                    self._send(200, json.dumps(arg).encode())
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _send(self, code: int, data: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    with _serve(Handler) as url:
        yield url, script


@contextmanager
def recording_proxy(upstream: str) -> Iterator[tuple[str, Script]]:
    """A loopback proxy in front of a real OpenAI-compatible server that records every
    byte on its way there: the real cloud answers, the test sees what was sent."""
    import urllib.error
    import urllib.request

    script = Script()
    lock = threading.Lock()
    base = upstream.rstrip("/").removesuffix("/v1")

    class Handler(http.server.BaseHTTPRequestHandler):
        def _forward(self, body: bytes | None) -> None:
            with lock:
                script.raw += self.requestline.encode() + b"\r\n" + bytes(self.headers)
                script.raw += body or b""
                if body:
                    script.received.append(json.loads(body))
            req = urllib.request.Request(base + self.path, data=body, method=self.command)
            req.add_header("Content-Type", "application/json")
            try:
                with urllib.request.urlopen(req, timeout=300) as r:
                    code, data = r.status, r.read()
            except urllib.error.HTTPError as e:
                code, data = e.code, e.read()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            self._forward(self.rfile.read(int(self.headers.get("Content-Length", 0))))

        def do_GET(self) -> None:
            self._forward(None)

        def log_message(self, *args: object) -> None:
            pass

    with _serve(Handler) as url:
        yield url, script
