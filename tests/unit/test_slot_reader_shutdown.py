"""A worker's reader thread that outlives the daemon's event loop (the daemon shutting down
while a worker still writes to its pipe) ends quietly instead of raising in its thread,
which pytest reports as an error in whichever test happens to be tearing down."""

from __future__ import annotations

import asyncio
import multiprocessing as mp

from sidecar.engine.slots import ProcessSlot


def test_the_reader_ends_quietly_once_the_event_loop_is_closed() -> None:
    ours, theirs = mp.Pipe()
    loop = asyncio.new_event_loop()
    loop.close()
    slot = object.__new__(ProcessSlot)  # only the reader's two fields: no worker process
    slot._loop = loop
    slot._conn = ours
    theirs.send(("pong", 1))
    theirs.close()
    slot._read()  # delivers nothing (the loop is gone), then sees EOF and returns
    ours.close()
