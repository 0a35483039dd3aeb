"""LoRA adapters on an encrypted store, with real process workers: the adapter blob is
sealed like a model's, a worker loads it from a descriptor of its decrypted memfd (never
the ciphertext, never a plaintext file) and closes that descriptor once llama.cpp has
read it, and every reply equals the one the same adapter gives on a plaintext store."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import make_config, start_app
from tiny_gguf import write_tiny_llama
from tiny_lora import write_lora

from sidecar.client import AsyncClient
from sidecar.fileio import sha256_file
from sidecar.store import sealed

pytestmark = pytest.mark.asyncio

KEY = {"SIDECAR_STORE_ENCRYPTION": "on", "SIDECAR_STORE_KEY": "5e" * 32}


async def _replies(
    site: Path, model: Path, loras: list[Path], env: dict[str, str] | None, slots: str = "process"
) -> tuple[list[Any], Any]:
    """Each adapter's replies (added in turn: the later versions swap the earlier out),
    and the app, still running."""
    site.mkdir()
    config = make_config(site, model, env=env, workers=1, context=512)
    app = await start_app(config, slot_kind=slots)
    client = AsyncClient(config.server.socket)
    out = []
    try:
        for lora in loras:
            added = (await client.add_model(lora, name="fmt", adapter_for="default")).version
            assert added.active and added.sha256 == sha256_file(lora)
            gen = await client.generate("Hello w", max_tokens=12, adapter="fmt")
            chat = await client.chat([("user", "hi")], max_tokens=6, adapter="fmt")
            cls = await client.classify("some text", ["yes", "no"], adapter="fmt")
            assert gen.adapter.version == added.sha256[:12]
            out.append((gen.text, chat.text, cls.label, [round(s.logprob, 4) for s in cls.scores]))
        bare = await client.generate("Hello w", max_tokens=12)
        out.append(bare.text)
    finally:
        await client.close()
    return out, app


async def test_an_adapter_answers_alike_from_an_encrypted_store(
    short_dir: Path, tmp_path: Path
) -> None:
    model = write_tiny_llama(tmp_path / "m.gguf", seed=18_401, n_ctx=4096)
    loras = [
        write_lora(tmp_path / f"v{i}.gguf", model, std=0.3, rank=8, seed=18_410 + i) for i in (1, 2)
    ]
    plain, app = await _replies(short_dir / "p", model, loras, None)
    await app.stop(grace=0)
    sealed_replies, app = await _replies(short_dir / "e", model, loras, KEY)
    try:
        assert sealed_replies == plain
        assert plain[0] != plain[1] and plain[0][0] != plain[-1]  # each adapter counts
        for lora in loras:  # stored sealed: the blob is not the file
            blob = app.store.blob(sha256_file(lora))
            assert sealed.is_sealed(blob) and blob.read_bytes()[:4] != b"GGUF"
        # The worker read the adapter from memory and let its descriptor go: it holds no
        # descriptor of an adapter's decrypted copy, and opened no adapter blob.
        (worker,) = app.local.pools["default"].workers()
        shas = {sha256_file(lora) for lora in loras}

        def adapter_fds() -> list[str]:
            return [t for t in _fd_targets(worker.info.pid) if any(sha in t for sha in shas)]

        await _until(lambda: not adapter_fds(), "the worker to close the adapters' copies")
        assert any(t.startswith("/memfd:sidecar-") for t in _fd_targets(worker.info.pid))
        # A worker held with SIGSTOP (the pool's background hold) gets the job and its
        # descriptor in its pipe's buffer, and reads both in order once continued.
        client = AsyncClient(app.config.server.socket)
        try:
            worker.suspend(True)
            job = asyncio.create_task(client.generate("Hello w", max_tokens=12, adapter="fmt"))
            await asyncio.sleep(0.5)
            assert not job.done()
            worker.suspend(False)
            assert (await job).text == plain[1][0]
        finally:
            await client.close()
        await _until(lambda: not adapter_fds(), "the worker to close the adapter's copy")
    finally:
        await app.stop(grace=0)


async def test_an_in_process_worker_loads_a_sealed_adapter_alike(
    short_dir: Path, tmp_path: Path
) -> None:
    """`serve --in-process` (ThreadSlot): the runner is in the daemon, given a descriptor
    of its own of the decrypted copy per job."""
    model = write_tiny_llama(tmp_path / "m.gguf", seed=18_403, n_ctx=4096)
    lora = write_lora(tmp_path / "a.gguf", model, std=0.3, rank=8, seed=18_430)
    plain, app = await _replies(short_dir / "p", model, [lora], None, "thread")
    await app.stop(grace=0)
    sealed_replies, app = await _replies(short_dir / "e", model, [lora], KEY, "thread")
    try:
        assert sealed_replies == plain and plain[0][0] != plain[-1]
        sha = sha256_file(lora)
        mine = [t for t in _fd_targets(os.getpid()) if sha in t]
        assert len(mine) == 1, mine  # the daemon's own copy only: the runner's were closed
    finally:
        await app.stop(grace=0)


async def test_an_adapter_whose_blob_is_damaged_is_refused_not_loaded(
    short_dir: Path, tmp_path: Path
) -> None:
    """A sealed adapter blob with one flipped byte fails authentication when it is
    decrypted for a worker: the request fails with the reason, the daemon keeps serving."""
    model = write_tiny_llama(tmp_path / "m.gguf", seed=18_402, n_ctx=4096)
    lora = write_lora(tmp_path / "a.gguf", model, std=0.3, seed=18_420)
    config = make_config(short_dir, model, env=KEY, workers=1, context=512)
    app = await start_app(config, slot_kind="process")
    client = AsyncClient(config.server.socket)
    try:
        added = (await client.add_model(lora, name="fmt", adapter_for="default")).version
        app.store.images.keep(())  # the adapter's decrypted copy goes: the next use decrypts
        blob = app.store.blob(added.sha256)
        os.chmod(blob, 0o644)
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 1
        blob.write_bytes(bytes(data))
        # The worker keeps the adapter it loaded, but each job's copy is decrypted anew
        # once the daemon let its copy go: the damage is found there, never loaded.
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.generate("Hello w", max_tokens=4, adapter="fmt")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value
        assert added.sha256[:12] in (e.value.details() or ""), e.value.details()
        assert (await client.generate("Hello w", max_tokens=4)).text  # still serving
    finally:
        await client.close()
        await app.stop(grace=0)


def _fd_targets(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return out


async def _until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_an_adapter_delta_update_on_an_encrypted_store_leaves_no_plaintext(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    """The delta is rebuilt from the serving adapter read through decryption, the new
    version sealed as it is written; the store (update work folder included) holds no
    adapter plaintext afterwards, and the new version serves."""
    from plaintext_scan import plaintext_in, tensor_run
    from test_adapters import adapter_origin  # type: ignore[import-not-found]

    _, v1, v2, delta_size, keys = adapter_origin(short_dir, tiny_model, (18_441, 18_442), rank=16)
    s = await serve(
        tiny_model, slot_kind="process", workers=1, context=512, model_keys=keys, env=KEY
    )
    await s.client.add_model(v1, name="fmt", adapter_for="default")
    outcome = await s.client.apply_update("default:fmt")
    assert outcome.installed and outcome.fetched_bytes == delta_size, outcome
    reply = await s.client.generate("Hello w", max_tokens=12, adapter="fmt")
    assert reply.adapter.version == sha256_file(v2)[:12]
    store = s.running.local.store
    for v in (v1, v2):
        assert sealed.is_sealed(store.blob(sha256_file(v)))
    runs = [tensor_run(v1), tensor_run(v2)]
    files = [Path(d) / f for d, _, fs in os.walk(store.root) for f in fs]
    assert any("updates" in p.parts for p in files)  # the work folder was scanned too
    leaks = [why for p in files if (why := plaintext_in(p, runs))]
    assert leaks == [], leaks
