"""Serving /metrics on loopback TCP or a Unix socket (mode 0600), in a background thread."""

from __future__ import annotations

import contextlib
import http.server
import socket
import socketserver
import threading
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class MetricsServer:
    """Serves /metrics on loopback TCP or a Unix socket, in a background thread."""

    def __init__(
        self, registry: CollectorRegistry, host: str, port: int, unix: Path | None
    ) -> None:
        handler = MetricsHandler.factory(registry)
        self._server: Any
        if unix is not None:
            unix.unlink(missing_ok=True)
            self._server = _UnixHTTPServer(str(unix), _unix_handler(handler))
            unix.chmod(0o600)
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            server_cls = type(
                "_TCP",
                (socketserver.ThreadingMixIn, http.server.HTTPServer),
                {"address_family": family, "daemon_threads": True},
            )
            self._server = server_cls((host, port), handler)
        self.unix = unix
        self.port = None if unix is not None else int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self.unix is not None:
            with contextlib.suppress(FileNotFoundError):
                self.unix.unlink()


def _unix_handler(
    base: type[http.server.BaseHTTPRequestHandler],
) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(base):  # type: ignore[valid-type,misc]
        # BaseHTTPRequestHandler expects (host, port); a Unix peer has neither.
        def address_string(self) -> str:
            return "unix"

    return Handler
