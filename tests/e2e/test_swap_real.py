"""Hot swap on the real daemon with the real models: SmolLM2-135M <-> Gemma 3 270M."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections import Counter
from pathlib import Path

import grpc
import pytest
from test_daemon import BANKING_LABELS, Daemon  # type: ignore[import-not-found]

from sidecar.client import Client
from sidecar.v1 import inference_pb2 as pb

pytestmark = pytest.mark.e2e

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import GEMMA3  # noqa: E402
from tiny_gguf import write_tiny_llama  # noqa: E402

CANARY = """
[models.default]
path = "{model}"
workers = 1
canary_prompt = "The capital of France is"
canary_expect = "(?i)(paris|france)"
"""


@pytest.fixture(scope="module")
def gemma() -> Path:
    if not GEMMA3.is_file():
        pytest.fail(
            f"{GEMMA3} is missing: ./scripts/test fetches it (SIDECAR_FETCH includes gemma3)"
        )
    return GEMMA3


def swap(c: Client, **kw: str) -> list[pb.SwapProgress]:
    return list(c.admin.Swap(pb.SwapRequest(**kw), timeout=300))


def refused(c: Client, **kw: str) -> str:
    with pytest.raises(grpc.RpcError) as e:
        swap(c, **kw)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
    return e.value.details() or ""


def load(sock: Path, stop: threading.Event, seen: Counter[str], errors: list[str], i: int) -> None:
    with Client(sock, caller=f"load{i}") as c:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                kind = (n + i) % 3
                if kind == 0:
                    r = c.classify("I think someone stole my card", BANKING_LABELS, timeout=120)
                    seen[r.model.version] += 1
                elif kind == 1:
                    r2 = c.generate("The weather today is", max_tokens=12, timeout=120)
                    seen[r2.model.version] += 1
                else:
                    chunks = list(c.generate_stream("Once upon a time", max_tokens=12, timeout=120))
                    seen[chunks[-1].summary.model.version] += 1
            except grpc.RpcError as e:
                errors.append(f"{e.code().name}: {e.details()}")


def test_ten_swaps_under_load_and_every_kind_of_bad_file(
    short_dir: Path, smollm2: Path, gemma: Path
) -> None:
    cfg = short_dir / "c.toml"
    cfg.write_text(CANARY.format(model=smollm2))
    d = Daemon(short_dir / "d.sock", smollm2, config=cfg).wait_ready()
    seen: Counter[str] = Counter()
    errors: list[str] = []
    stop = threading.Event()
    threads = [
        threading.Thread(target=load, args=(d.socket, stop, seen, errors, i)) for i in range(4)
    ]
    try:
        with Client(d.socket) as c:
            smol = c.status().models[0].model.version
            for t in threads:
                t.start()
            gem = swap(c, path=str(gemma))[-1].new.version
            for i in range(10):
                target = smol if i % 2 == 0 else gem
                assert swap(c, version=target)[-1].new.version == target
            serving = c.status().models[0].model.version
            # Every kind of bad file, while the load goes on.
            data = gemma.read_bytes()
            (short_dir / "truncated.gguf").write_bytes(data[: len(data) // 2])
            i = data.index(b"token_embd.weight") + len(b"token_embd.weight")
            (short_dir / "corrupt.gguf").write_bytes(
                data[:i] + b"\xff\xff\xff\x7f" + data[i + 4 : i + 4096]
            )
            (short_dir / "notgguf.gguf").write_bytes(b"<html>404</html>\n" * 1000)
            write_tiny_llama(short_dir / "gibberish.gguf", seed=7, n_ctx=4096)
            reasons = {
                name: refused(c, path=str(short_dir / f"{name}.gguf"))
                for name in ("truncated", "corrupt", "notgguf", "gibberish")
            }
            stop.set()
            for t in threads:
                t.join(180)
            assert "at validating" in reasons["truncated"] and "truncated" in reasons["truncated"]
            assert "corrupt tensor table" in reasons["corrupt"]
            assert "not a GGUF file" in reasons["notgguf"]
            assert "at canary" in reasons["gibberish"]
            assert errors == [], errors[:5]
            assert set(seen) == {smol, gem}, seen  # both served, nothing else ever
            assert sum(seen.values()) > 20
            st = c.status().models[0]
            assert st.model.version == serving
            versions = {
                v.sha256[:12]: v for v in c.admin.ListVersions(pb.ListVersionsRequest()).versions
            }
            assert set(versions) == {smol, gem}  # refused files never entered the store
            assert versions[serving].active
            quarantine = short_dir / "store" / "quarantine"
            # Only the store's own file (the canary failure) is copied aside; for files the
            # caller merely named, the reason is recorded without a copy.
            assert len(list(quarantine.glob("*.gguf"))) == 1
            assert len(list(quarantine.glob("*.gguf.reason"))) == 4
    finally:
        stop.set()
        d.stop()


def test_kill_9_in_the_middle_of_a_swap_comes_back_on_a_complete_model(
    short_dir: Path, smollm2: Path, gemma: Path
) -> None:
    d = Daemon(short_dir / "d.sock", smollm2, "--workers", "1").wait_ready()
    with Client(d.socket) as c:
        smol = c.status().models[0].model.version
        for step in c.admin.Swap(pb.SwapRequest(path=str(gemma)), timeout=300):
            if step.stage == "loading":  # the new file is stored; its workers are starting
                os.kill(d.proc.pid, signal.SIGKILL)
                break
    d.proc.wait(30)
    for worker in _orphans(d.socket):
        os.kill(worker, signal.SIGKILL)
    again = Daemon(d.socket, smollm2, "--workers", "1").wait_ready()
    with Client(again.socket) as c:
        assert c.status().models[0].model.version == smol  # the pointer never moved
        assert c.classify("my card was stolen", BANKING_LABELS).label == "lost_or_stolen_card"
        stored = {v.sha256[:12] for v in c.admin.ListVersions(pb.ListVersionsRequest()).versions}
        gem = next(v for v in stored if v != smol)  # stored complete and verified
        assert swap(c, version=gem)[-1].new.version == gem
    assert not list((short_dir / "store" / "blobs").glob("*.partial"))
    again.stop()


def _orphans(sock: Path) -> list[int]:
    """Workers of a killed daemon exit on their own when their pipe closes; none should linger."""
    import psutil

    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"] and str(sock) in " ".join(p.info["cmdline"])
    ]
