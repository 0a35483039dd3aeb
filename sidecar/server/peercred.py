"""Kernel-verified caller identity on the Unix socket.

gRPC Python does not expose a connection's SO_PEERCRED (grpc/grpc#15511, #28755), so
the fair queue could not tell applications apart. This front door accepts on the
public socket, reads the peer's uid and pid from the kernel, and relays the bytes to
the gRPC server on a private socket from a client socket *bound to an abstract name*
that carries those credentials. gRPC reports that bound name as the peer
("unix-abstract:sidecar-peer/<daemon pid>/<uid>/<pid>/<n>"), and `caller_of` reads it.

The private socket lives beside the public one (same 0700 directory, mode 0600), so
only the daemon's user could reach it directly. The relay is plain asyncio protocols
with backpressure in both directions; it never parses HTTP/2.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import struct
from pathlib import Path

PEER_PREFIX = "sidecar-peer/"
_ids = itertools.count(1)


def peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """(uid, pid) of the process at the other end of a Unix stream socket."""
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return uid, pid


def parse_peer(peer: str) -> tuple[int, int] | None:
    """(uid, pid) from a gRPC peer string made by this relay, else None."""
    _, _, name = peer.partition(":")
    if not name.startswith(PEER_PREFIX):
        return None
    parts = name[len(PEER_PREFIX) :].split("/")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[1]), int(parts[2])


class _Half(asyncio.Protocol):
    """One side of a relayed connection; writes what it reads to `other`."""

    def __init__(self, relay: PeerCredRelay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.other: _Half | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.relay._track(transport)

    def data_received(self, data: bytes) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.relay._forget(self.transport)
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()

    # Backpressure: when our outgoing buffer fills, stop reading from the other side.
    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def flush_to(self, other: _Half) -> None:
        self.other = other
        for chunk in self.pending:
            assert other.transport is not None
            other.transport.write(chunk)
        self.pending.clear()


class _Front(_Half):
    """The application's side: on connect, dial the gRPC server under the peer's name."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        task = asyncio.get_running_loop().create_task(
            self.relay._connect_back(self, self.transport)
        )
        self.relay._tasks.add(task)
        task.add_done_callback(self.relay._tasks.discard)


class PeerCredRelay:
    def __init__(self, public: Path, private: Path) -> None:
        self.public = public
        self.private = private
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Transport] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._drained = asyncio.Event()  # set while no connection is open

    def _track(self, transport: asyncio.Transport) -> None:
        self._conns.add(transport)
        self._drained.clear()

    def _forget(self, transport: asyncio.Transport) -> None:
        self._conns.discard(transport)
        if not self._conns:
            self._drained.set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._front, str(self.public))

    def _front(self) -> _Front:
        return _Front(self)

    async def _connect_back(self, front: _Half, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            uid, pid = peer_credentials(transport.get_extra_info("socket"))
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            up.bind(f"\0{PEER_PREFIX}{os.getpid()}/{uid}/{pid}/{next(_ids)}")
            up.setblocking(False)
            await loop.sock_connect(up, str(self.private))
            _, back = await loop.create_connection(lambda: _Half(self), sock=up)
        except (OSError, struct.error):
            transport.close()
            return
        back.other = front
        front.flush_to(back)
        if transport.is_closing():
            assert back.transport is not None
            back.transport.close()

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.public.unlink()

    async def close(self, drain: float = 2.0) -> None:
        """Stop relaying, once what is in flight got through (at most `drain` seconds).

        Called after the gRPC server stopped: it wrote its streams' last messages and
        trailers, then closed its ends, but those bytes may still sit in our receive buffers.
        Cutting at once lost them, and a stream that finished within the grace period ended
        for its caller as "Socket closed". Each connection closes itself on the server's EOF
        after flushing to the application; one whose application stopped reading is cut
        when `drain` is up.
        """
        self.stop_accepting()
        for task in list(self._tasks):
            task.cancel()
        if self._conns:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), drain)
        for t in list(self._conns):
            t.abort()
        self._conns.clear()
        with contextlib.suppress(FileNotFoundError):
            self.private.unlink()
