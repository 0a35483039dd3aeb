"""Where a client connects and what it sends with every call: the one way `Client`,
`AsyncClient` and the CLI find the daemon, the metadata, the channel options, the retries."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.calls.callers import CALLER_HEADER
from sidecar.client.retry import Retry
from sidecar.config import Overrides, load_client

MAX_MESSAGE = 64 * 1024 * 1024


@dataclass(frozen=True)
class Daemon:
    """Where a daemon answers: a gRPC target, the socket behind it, the token to send."""

    target: str  # "unix:/path" or "host:port"
    socket: Path | None  # None over TCP
    token: str | None


def find_daemon(
    socket: str | Path | None = None,
    *,
    tcp: str | None = None,
    token: str | None = None,
    config: Path | None = None,
) -> Daemon:
    """The one way `Client`, `AsyncClient` and the CLI find the daemon: what the caller
    gave, else the client view of the config (`sidecar.config.load_client`:
    SIDECAR_SERVER_SOCKET > the config file (`config`, else SIDECAR_CONFIG, else the user
    config, else /etc/sidecar/config.toml) > the default socket path). The file is read only
    for what was not given; a file that cannot be read raises `ConfigError` naming the key."""
    if tcp:
        if token is None:  # a TCP listener wants server.tcp_token; a Unix socket wants none
            token = load_client(Overrides(config=config)).tcp_token or None
        return Daemon(tcp, None, token)
    path = Path(socket) if socket else load_client(Overrides(config=config)).socket
    return Daemon(f"unix:{path}", path, token)


class Connection:
    """What both clients hold: the daemon found, the default timeout, the metadata every call
    carries, the retry policy and the channel options."""

    def __init__(self, socket: str | Path | None, tcp: str | None, token: str | None,
                 timeout: float | None, caller: str | None, config: Path | None, retries: int,
                 backoff_s: float, backoff_max_s: float) -> None:  # fmt: skip
        daemon = find_daemon(socket, tcp=tcp, token=token, config=config)
        self.target = daemon.target
        self.socket = daemon.socket
        self.timeout = timeout
        self.retry = Retry(retries, backoff_s, backoff_max_s)
        self._md = metadata(daemon.token, caller)
        self._options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
        if retries:
            # gRPC waits 1 s (growing to 120 s) before it reconnects to a daemon that was not
            # there; a retry within that wait fails at once without trying. Retrying clients
            # reconnect on their own schedule instead.
            ms = int(backoff_s * 1000)
            self._options += [
                ("grpc.initial_reconnect_backoff_ms", ms),
                ("grpc.min_reconnect_backoff_ms", ms),
                ("grpc.max_reconnect_backoff_ms", int(backoff_max_s * 1000)),
            ]

    def _kw(self, timeout: float | None) -> dict[str, Any]:
        """The keyword arguments of one gRPC call: its deadline and metadata."""
        return {"timeout": timeout if timeout is not None else self.timeout, "metadata": self._md}


def metadata(token: str | None, caller: str | None) -> tuple[tuple[str, str], ...]:
    md: list[tuple[str, str]] = []
    if token:
        md.append(("authorization", f"Bearer {token}"))
    if caller:
        md.append((CALLER_HEADER, caller))
    return tuple(md)
