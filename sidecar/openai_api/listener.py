"""Running the HTTP API on the daemon's own event loop: loopback TCP and/or a Unix socket.

uvicorn serves sockets we bind ourselves, so the Unix socket is born 0600 (uvicorn's own
`uds=` makes it world-writable) and a stale one is reclaimed by the same lock as the
gRPC socket. uvicorn must not install signal handlers: the daemon owns SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from sidecar.config import HttpConfig
from sidecar.server.socket_claim import SocketClaim

log = logging.getLogger("sidecar.http")


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
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=socks))
        while not self._server.started:
            if self._task.done():
                self._release()
                self._task.result()  # raises what failed
                raise RuntimeError("the HTTP listener stopped during start")
            await asyncio.sleep(0.01)
        where = [f"unix:{self.socket}"] if self.socket else []
        where += [f"http://{self._config.host}:{self.port}"] if self.port else []
        log.info("OpenAI-compatible HTTP API on %s", ", ".join(where))

    async def close(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded by the grace), release."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
        self._release()

    def _release(self) -> None:
        if self._claim is not None:  # removes the socket file too
            self._claim.release()
            self._claim = None
