"""A trickling origin (one byte a second keeps every socket timeout happy) against the
download's total deadline, its rate floor and its cancel switch, on real loopback HTTP."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from trickle import TrickleOrigin

from sidecar.fileio import sha256_file
from sidecar.update.fetch import Aborted, Control, FetchError, fetch_bytes, fetch_file

SIZE = 10_000


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    (root / "blob.bin").write_bytes(os.urandom(SIZE))
    return root


def sha(root: Path) -> str:
    return sha256_file(root / "blob.bin")


@pytest.fixture
def trickling(root: Path) -> Iterator[TrickleOrigin]:
    with TrickleOrigin(root, trickle=(".bin",), interval=1.0) as o:
        yield o


def test_a_trickling_body_is_cut_at_the_deadline_and_keeps_its_partial(
    trickling: TrickleOrigin, root: Path, tmp_path: Path
) -> None:
    part = tmp_path / "blob.partial"
    t0 = time.monotonic()
    with pytest.raises(Aborted) as e:
        fetch_file(trickling.url + "blob.bin", part, size=SIZE, sha256=sha(root),
                   control=Control(deadline_seconds=2.5))  # fmt: skip
    took = time.monotonic() - t0
    assert 2.4 < took < 15, took  # loose: a shared, noisy machine
    assert e.value.kind == "deadline"
    assert "deadline of 2.5s" in str(e.value) and f"of {SIZE} bytes" in str(e.value)
    assert 1 <= part.stat().st_size <= 4  # what came is kept for the next attempt


@pytest.mark.parametrize("call", ["file", "bytes"])
def test_trickled_headers_are_cut_at_the_deadline_too(
    root: Path, tmp_path: Path, call: str
) -> None:
    with TrickleOrigin(root, trickle=(".bin",), interval=1.0, slow_headers=True) as o:
        t0 = time.monotonic()
        with pytest.raises(Aborted, match="deadline"):
            if call == "file":
                fetch_file(o.url + "blob.bin", tmp_path / "p", size=SIZE, sha256=sha(root),
                           control=Control(deadline_seconds=1.5))  # fmt: skip
            else:
                fetch_bytes(o.url + "blob.bin", max_bytes=1 << 20,
                            control=Control(deadline_seconds=1.5))  # fmt: skip
        assert time.monotonic() - t0 < 15


def test_a_cancel_from_another_thread_ends_a_silent_read_at_once(
    root: Path, tmp_path: Path
) -> None:
    with TrickleOrigin(root, trickle=(".bin",), stall=True) as o:
        control = Control()  # no deadline; the socket timeout is a long 30 s
        threading.Timer(0.5, control.cancel, ("cancelled", "nobody waits")).start()
        t0 = time.monotonic()
        with pytest.raises(Aborted, match="nobody waits") as e:
            fetch_file(o.url + "blob.bin", tmp_path / "p", size=SIZE, sha256=sha(root),
                       timeout=30, retries=5, control=control)  # fmt: skip
        assert e.value.kind == "cancelled"
        assert time.monotonic() - t0 < 10
        assert len(o.requests) == 1  # a cancelled fetch is not retried


def test_an_origin_under_the_rate_floor_is_cut_and_retried(root: Path, tmp_path: Path) -> None:
    with TrickleOrigin(root, trickle=(".bin",), interval=0.1) as o:
        t0 = time.monotonic()
        with pytest.raises(FetchError, match="under the 1000 floor") as e:
            fetch_file(o.url + "blob.bin", tmp_path / "p", size=SIZE, sha256=sha(root),
                       timeout=1, retries=1, backoff=0.01,
                       control=Control(min_rate=1000))  # fmt: skip
        assert not isinstance(e.value, Aborted)
        assert time.monotonic() - t0 < 20
        assert [r for _, r in o.requests][1].startswith("bytes=")  # the retry resumed


def test_a_fast_origin_is_untouched_by_deadline_and_floor(root: Path, tmp_path: Path) -> None:
    with TrickleOrigin(root) as o:
        part = tmp_path / "p"
        control = Control(deadline_seconds=10, min_rate=1000)
        fetch_file(o.url + "blob.bin", part, size=SIZE, sha256=sha(root), control=control)
        assert part.read_bytes() == (root / "blob.bin").read_bytes()
        assert (control.done, control.total) == (SIZE, SIZE)
