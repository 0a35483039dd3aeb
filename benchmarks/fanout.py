"""Rows shared out over client threads, one Client per thread, results in row order."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sidecar.client import Client

Row = TypeVar("Row")


def each_row(
    sock: Path,
    rows: Sequence[Row],
    clients: int,
    caller: str,
    one: Callable[[Client, Row], dict[str, Any]],
) -> tuple[list[dict[str, Any]], float]:
    """`one(client, row)` for every row from `clients` threads, each taking the next row when
    it is free (a closed loop); (one record per row in row order, wall seconds)."""
    out: list[dict[str, Any] | None] = [None] * len(rows)
    nxt = iter(range(len(rows)))
    lock = threading.Lock()

    def worker() -> None:
        with Client(sock, caller=caller) as c:
            while True:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                out[i] = one(c, rows[i])

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in out if r is not None], time.perf_counter() - started
