"""The peer-credential relay hands on everything the server wrote before it closed.

At shutdown the gRPC server writes a stream's last messages and its trailers, then closes
its connections; the daemon closes the relay right after. Bytes still in the relay's
receive buffer then must reach the application, or a stream that finished inside the grace
period ends for its caller as "Socket closed" (seen once in a full test run).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from sidecar.server.peercred import PeerCredRelay, parse_peer

pytestmark = pytest.mark.asyncio

PAYLOAD = os.urandom(4 << 20)  # far beyond the socket buffers: most of it is still in flight


@pytest.fixture
async def relayed(short_dir: Path):  # type: ignore[no-untyped-def]
    """start(backend): a relay in front of a plain Unix server that runs `backend`."""
    servers: list[asyncio.Server] = []

    async def start(backend) -> PeerCredRelay:  # type: ignore[no-untyped-def]
        relay = PeerCredRelay(short_dir / "public.sock", short_dir / "private.sock")
        servers.append(await asyncio.start_unix_server(backend, str(relay.private)))
        await relay.start()
        return relay

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_what_the_server_wrote_before_closing_reaches_the_caller_after_close(relayed) -> None:  # type: ignore[no-untyped-def]
    wrote = asyncio.Event()

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        writer.write(PAYLOAD)  # no drain: nobody reads until the relay is closing
        writer.close()
        wrote.set()

    relay = await relayed(backend)
    reader, writer = await asyncio.open_unix_connection(str(relay.public))
    writer.write(b"hello")
    await wrote.wait()
    closing = asyncio.create_task(relay.close())
    got = await asyncio.wait_for(reader.read(), 30)  # up to EOF
    await closing
    assert len(got) == len(PAYLOAD) and got == PAYLOAD
    writer.close()
    await writer.wait_closed()


async def test_a_caller_that_stops_reading_is_cut_when_the_drain_time_is_up(relayed) -> None:  # type: ignore[no-untyped-def]
    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(PAYLOAD)
        await writer.drain()
        await reader.read()

    relay = await relayed(backend)
    _, writer = await asyncio.open_unix_connection(str(relay.public))
    await asyncio.sleep(0.2)  # the relay's buffers fill; nobody reads
    loop = asyncio.get_running_loop()
    started = loop.time()
    await relay.close(drain=0.3)
    assert loop.time() - started < 5
    assert not relay._conns
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def test_the_server_sees_the_caller_under_its_kernel_credentials(relayed) -> None:  # type: ignore[no-untyped-def]
    peers: list[tuple[int, int] | None] = []

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        name = writer.get_extra_info("peername")
        peers.append(parse_peer(f"unix-abstract:{name[1:].decode()}"))
        writer.close()

    relay = await relayed(backend)
    reader, writer = await asyncio.open_unix_connection(str(relay.public))
    assert await asyncio.wait_for(reader.read(), 10) == b""
    assert peers == [(os.getuid(), os.getpid())]
    writer.close()
    await writer.wait_closed()
    await relay.close()
