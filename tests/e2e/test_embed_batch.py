"""Embed on the real demo model: a text's vector does not depend on what it was batched
with (one request of many texts, one request per text, concurrent requests)."""

from __future__ import annotations

import csv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from test_daemon import Daemon

from sidecar.client import Client

pytestmark = pytest.mark.e2e

BANKING77 = Path("/work/shared/data/banking77/test.csv")
FALLBACK = [
    "I lost my bank card",
    "My card is missing",
    "How do I top up my account?",
    "Why was my transfer declined?",
    "What is the exchange rate today?",
    "My PIN is blocked, what do I do?",
    "When will my new card arrive?",
    "The weather is sunny today",
]


def texts() -> list[str]:
    if not BANKING77.is_file():
        return FALLBACK * 3
    with BANKING77.open() as f:
        rows = list(csv.reader(f))[1:]
    return [r[0] for r in rows[::97][:24]]


def vectors(reply: object) -> np.ndarray:
    return np.array([list(e.values) for e in reply.embeddings], np.float32)  # type: ignore[attr-defined]


def test_a_text_embeds_the_same_alone_together_and_beside_other_requests(
    short_dir: Path, smollm2: Path
) -> None:
    d = Daemon(short_dir / "e.sock", smollm2, "--workers", "2").wait_ready()
    ts = texts()
    try:
        with Client(d.socket) as c:
            together = vectors(c.embed(ts, normalize=True))
            alone = np.vstack([vectors(c.embed([t], normalize=True)) for t in ts])

        def one(t: str) -> np.ndarray:
            with Client(d.socket) as c:
                return vectors(c.embed([t], normalize=True))[0]

        with ThreadPoolExecutor(8) as pool:
            concurrent = np.vstack(list(pool.map(one, ts)))
        assert np.array_equal(together, alone)
        assert np.array_equal(alone, concurrent)
        assert np.allclose(np.linalg.norm(alone, axis=1), 1, atol=1e-5)

        with Client(d.socket) as c, pytest.raises(grpc.RpcError) as e:
            c.embed(["fine", "word " * 2000])
        assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert "texts[1] is" in (e.value.details() or "")
    finally:
        d.stop()
