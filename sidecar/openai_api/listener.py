"""Running the HTTP API on the daemon's own event loop: loopback TCP and/or a Unix socket.

uvicorn serves sockets we bind ourselves, so the Unix socket is born 0600 (uvicorn's own
`uds=` makes it world-writable) and a stale one is reclaimed by the same lock as the
gRPC socket. uvicorn must not install signal handlers: the daemon owns SIGTERM/SIGINT.

uvicorn bounds only the idle time between requests (keep-alive), and any byte resets it:
headers trickled a byte at a time, or a chunked body that never ends, held a connection
(and its file descriptor) open for good. `_TimedH11` gives each request's headers and body
a deadline counted from when that part may start, which no trickle extends. The deadlines
bound what the client sends, never how long the answer takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from sidecar.config import HttpConfig
from sidecar.openai_api.app import error_body
from sidecar.socket_claim import SocketClaim

log = logging.getLogger("sidecar.http")

# From connection (or the end of the previous response) to the end of the request headers,
# and from there to the end of the body. Loopback clients send a 4 MB body in milliseconds.
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0


class _TimedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's headers and on its body."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = {"headers": HEADER_TIMEOUT_S, "body": BODY_TIMEOUT_S}
        self._phase: str | None = None  # what the client owes us: "headers", "body" or nothing
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()  # the next request's headers are due (a kept-alive connection)

    def connection_lost(self, exc: Exception | None) -> None:
        self._arm(None)
        super().connection_lost(exc)

    def _watch(self) -> None:
        state = self.conn.their_state
        phase = "headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        if phase != self._phase and not self.transport.is_closing():
            self._arm(phase)

    def _arm(self, phase: str | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        if phase is not None:
            self._deadline = self.loop.call_later(self._limits[phase], self._expired, phase)

    def _expired(self, phase: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        began = bool(self.conn.trailing_data[0]) if phase == "headers" else True
        answered = self.cycle is not None and self.cycle.response_started and phase == "body"
        log.debug("HTTP connection from %s cut: the request %s timed out", self.client, phase)
        if began and not answered:  # say why; an idle kept-alive connection just closes
            text = f"the request {phase} did not arrive within {self._limits[phase]:g} s"
            body = json.dumps(error_body(text, "invalid_request_error", "request_timeout"))
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n{body}".encode()
            )
        self.transport.close()


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpListener:
    def __init__(
        self, app: ASGIApp, config: HttpConfig, socket_mode: int, grace_seconds: float
    ) -> None:
        self._app = app
        self._config = config
        self._mode = socket_mode
        self._grace = grace_seconds
        self._claim: SocketClaim | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port: int | None = None
        self.socket: Path | None = Path(config.socket) if config.socket else None

    def _bind(self) -> list[socket.socket]:
        socks: list[socket.socket] = []
        try:
            if self.socket is not None:
                claim = SocketClaim(self.socket)
                claim.acquire()  # raises SocketBusy: then nothing of the other owner's is touched
                self._claim = claim
                unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                socks.append(unix)
                old = os.umask(0o177)  # no window where others could connect
                try:
                    unix.bind(str(self.socket))
                finally:
                    os.umask(old)
                os.chmod(self.socket, self._mode)
            if self._config.port:
                family = socket.AF_INET6 if ":" in self._config.host else socket.AF_INET
                tcp = socket.create_server((self._config.host, self._config.port), family=family)
                socks.append(tcp)
                self.port = tcp.getsockname()[1]
            for s in socks:
                s.listen(128)
                s.setblocking(False)
        except BaseException:
            for s in socks:
                s.close()
            self._release()
            raise
        return socks

    async def start(self) -> None:
        socks = self._bind()
        config = uvicorn.Config(
            self._app,
            lifespan="off",
            log_config=None,
            access_log=False,  # the app writes one line per request itself
            timeout_graceful_shutdown=max(int(self._grace), 1),
            server_header=False,
            http=_TimedH11,
            ws="none",  # no route speaks WebSocket; an upgraded connection would escape the deadlines
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=socks))
        while not self._server.started:
            if self._task.done():
                # Left as if never started: a close() after this has nothing to stop.
                failed, self._task, self._server = self._task, None, None
                self._release()
                failed.result()  # raises what failed
                raise RuntimeError("the HTTP listener stopped during start")
            await asyncio.sleep(0.01)
        where = [f"unix:{self.socket}"] if self.socket else []
        where += [f"http://{self._config.host}:{self.port}"] if self.port else []
        log.info("OpenAI-compatible HTTP API on %s", ", ".join(where))

    async def close(self, grace_seconds: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (bounded by the grace: the one
        given, else the one at start), release."""
        if self._server is not None and self._task is not None:
            if grace_seconds is not None:  # a SIGHUP may have changed it since start
                self._server.config.timeout_graceful_shutdown = max(int(grace_seconds), 1)
            self._server.should_exit = True
            await self._task
        self._release()

    def _release(self) -> None:
        if self._claim is not None:  # removes the socket file too
            self._claim.release()
            self._claim = None
