"""benchmarks.fanout: every row once, in row order, whatever thread took it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from benchmarks.fanout import each_row
from sidecar.client import Client


def test_each_row_runs_every_row_once_in_order(tmp_path: Path) -> None:
    seen: list[int] = []
    threads: set[int] = set()
    lock = threading.Lock()
    gate = threading.Barrier(3, timeout=5)

    def one(c: Client, row: int) -> dict[str, Any]:
        assert isinstance(c, Client)
        if row < 3:
            gate.wait()  # the first three rows are in flight at once: three threads serve
        with lock:
            seen.append(row)
            threads.add(threading.get_ident())
        return {"row": row, "double": 2 * row}

    # No call goes out: the clients are never used, so the socket need not exist.
    out, wall = each_row(tmp_path / "none.sock", list(range(20)), 3, "test", one)
    assert [r["row"] for r in out] == list(range(20))
    assert [r["double"] for r in out] == [2 * i for i in range(20)]
    assert sorted(seen) == list(range(20))
    assert len(threads) == 3
    assert wall > 0
