"""Attacks on the store through the real gRPC Admin API and the drop folder (issue 12).

Fake slots: these are about files, names and status codes, not about llama.cpp.
"""

from __future__ import annotations

import asyncio
import math
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from tiny_gguf import write_tiny_llama

from sidecar.client import AsyncClient
from sidecar.v1 import inference_pb2 as pb

pytestmark = pytest.mark.asyncio


def gguf_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def bad_alignment(src: Path, dst: Path, kind: int, payload: bytes) -> Path:
    data = src.read_bytes()
    (n_kv,) = struct.unpack_from("<Q", data, 16)
    entry = gguf_str("general.alignment") + struct.pack("<I", kind) + payload
    dst.write_bytes(data[:16] + struct.pack("<Q", n_kv + 1) + entry + data[24:])
    return dst


def alignment_variants(src: Path, d: Path) -> dict[str, Path]:
    return {
        "string": bad_alignment(src, d / "align-string.gguf", 8, gguf_str("x32")),
        "inf": bad_alignment(src, d / "align-inf.gguf", 6, struct.pack("<f", math.inf)),
        "list": bad_alignment(
            src, d / "align-list.gguf", 9, struct.pack("<IQ", 8, 1) + gguf_str("32")
        ),
    }


async def rpc_error(call: Callable[[], object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        result = call()
        if hasattr(result, "__aiter__"):
            async for _ in result:  # type: ignore[attr-defined]
                pass
        else:
            await result  # type: ignore[misc]
    return e.value


async def test_bad_alignment_via_add_and_swap_is_refused_with_a_reason(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    s = await serve(tiny_model)
    for how, path in alignment_variants(tiny_model, short_dir).items():
        e = await rpc_error(lambda p=path: s.client.admin.AddModel(pb.AddModelRequest(path=str(p))))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (how, e.details())
        assert "general.alignment" in (e.details() or "")
        e = await rpc_error(lambda p=path: s.client.admin.Swap(pb.SwapRequest(path=str(p))))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, (how, e.details())
        assert "swap refused at validating" in (e.details() or "")
        assert "general.alignment" in (e.details() or "")
    assert (await s.client.generate("still serving", max_tokens=1)).text is not None


async def test_remove_version_cannot_reach_outside_the_store(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    s = await serve(tiny_model)
    store = s.running.local.store
    sha = store.active("default")
    # <store>/models/../../../victim is <short_dir>/../victim: plant it one level lower.
    victim = store.models / ".." / ".." / "victim" / "versions"
    victim.mkdir(parents=True)
    planted = victim / f"{sha}"
    planted.write_text("not the store's")
    for name in ("../../victim", "../../../victim", "a/../../b", ".."):
        e = await rpc_error(
            lambda n=name: s.client.admin.RemoveVersion(
                pb.RemoveVersionRequest(model=n, version=sha[:12])
            )
        )
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, e.details())
    assert planted.read_text() == "not the store's"


async def test_names_with_newlines_or_a_megabyte_are_refused_or_echoed_short(
    serve, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = await serve(tiny_model)
    for name in ("a\nb", "x" * 1_000_000):
        e = await rpc_error(
            lambda n=name: s.client.admin.AddModel(
                pb.AddModelRequest(model=n, path=str(tiny_model))
            )
        )
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(e.details() or "") < 300 and "\n" not in (e.details() or "")
        e = await rpc_error(lambda n=name: s.client.generate("hi", model=n, max_tokens=1))
        assert e.code() == grpc.StatusCode.NOT_FOUND  # an unknown name is still just unknown
        assert len(e.details() or "") < 300 and "\n" not in (e.details() or "")
    assert store_names(s) == ["default"]


def store_names(s: object) -> list[str]:
    return s.running.local.store.names()  # type: ignore[attr-defined, no-any-return]


async def test_a_swap_to_a_named_secret_file_copies_nothing(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    s = await serve(tiny_model)
    secret = short_dir / "shadow"
    secret.write_text("root:$6$very-secret-hash:19000::::::\n")
    secret.chmod(0o600)
    e = await rpc_error(lambda: s.client.admin.Swap(pb.SwapRequest(path=str(secret))))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    q = s.running.local.store.quarantine_dir
    assert stat.S_IMODE(q.stat().st_mode) == 0o700
    for p in q.iterdir():
        assert "very-secret" not in p.read_text(errors="replace"), p
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert len(list(q.iterdir())) == 1  # the reason, nothing else
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and secret.stat().st_nlink == 1


async def test_the_users_file_is_copied_not_linked_and_a_changed_blob_is_never_served(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    s = await serve(tiny_model)
    user = write_tiny_llama(short_dir / "v2.gguf", seed=5)
    user.chmod(0o644)
    reply = await s.client.admin.AddModel(pb.AddModelRequest(path=str(user)))
    sha = reply.version.sha256
    assert stat.S_IMODE(user.stat().st_mode) == 0o644 and user.stat().st_nlink == 1
    user.write_bytes(b"the user reuses their file")
    blob = s.running.local.store.blob(sha)
    assert blob.stat().st_size == reply.version.size  # the store kept its bytes
    # Someone who can write the store changes the blob: a swap to it must not go ahead.
    blob.chmod(0o644)
    with blob.open("r+b") as f:
        f.seek(3000)
        f.write(b"\x11" * 16)
    old = (await s.client.status()).models[0].model.version
    e = await rpc_error(lambda: s.client.admin.Swap(pb.SwapRequest(version=sha[:12])))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "changed on disk" in (e.details() or "")
    assert (await s.client.status()).models[0].model.version == old


async def wait_for(check: Callable[[], bool], seconds: float = 20) -> None:
    end = asyncio.get_running_loop().time() + seconds
    while not check():
        assert asyncio.get_running_loop().time() < end, "timed out"
        await asyncio.sleep(0.05)


async def test_the_drop_watcher_survives_bad_files_and_reports_its_health(
    tiny_model: Path, short_dir: Path
) -> None:
    from conftest import make_config, start_app

    from sidecar.cli.commands import main

    drop = short_dir / "drop"
    config = make_config(short_dir, tiny_model)
    config = replace(config, store=replace(config.store, drop=drop, auto_swap=True))
    running = await start_app(config, slot_kind="fake")
    client = AsyncClient(config.server.socket)
    try:
        assert running.drop is not None
        assert (await client.status()).drop_watcher == f"watching {drop}"
        bad = alignment_variants(tiny_model, short_dir)
        for how, path in bad.items():
            os.replace(path, drop / f"{how}.gguf")
        (drop / "loop-a.gguf").symlink_to(drop / "loop-b.gguf")
        (drop / "loop-b.gguf").symlink_to(drop / "loop-a.gguf")
        (drop / "not-ours.gguf").symlink_to(tiny_model)
        await wait_for(lambda: len(running.drop.results) >= 6)
        results = "\n".join(running.drop.results)
        for how in bad:
            assert f"'{how}.gguf': refused" in results and "general.alignment" in results
        assert "'loop-a.gguf': refused: it is a symbolic link" in results
        assert "'not-ours.gguf': refused: it is a symbolic link" in results
        assert tiny_model.exists()  # a link is set aside, never what it points at
        assert [p.name for p in drop.iterdir()] == []
        # Still watching: a good file after all that is taken and served.
        good = write_tiny_llama(short_dir / "good.gguf.tmp", seed=6)
        good.rename(drop / "good.gguf")
        await wait_for(lambda: any("good.gguf" in r for r in running.drop.results))
        assert "now serves" in running.drop.results[-1]
        health = (await client.status()).drop_watcher
        assert health.startswith(f"watching {drop}") and "good.gguf" in health
        runner = CliRunner()
        out = await asyncio.to_thread(
            runner.invoke, main, ["status", "--socket", str(config.server.socket)]
        )
        assert out.exit_code == 0, out.output
        assert f"drop folder: watching {drop}" in out.output
        # A watcher that stopped says why.
        running.drop._stopped = "cannot watch it"
        assert (await client.status()).drop_watcher == "stopped: cannot watch it"
    finally:
        await client.close()
        await running.stop(grace=0)


async def test_a_bug_while_taking_one_file_refuses_that_file_only(
    serve, tiny_model: Path, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sidecar.dropwatch import DropWatcher

    s = await serve(tiny_model)
    store = s.running.local.store
    real_add = store.add

    def add(src: Path, name: str, **kw: object) -> str:
        if src.name == "boom.gguf":
            raise RuntimeError("a bug below the watcher")
        return real_add(src, name, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "add", add)
    drop = short_dir / "drop"
    watcher = DropWatcher(s.running.local, drop, auto_swap=False)
    await watcher.start()
    try:
        write_tiny_llama(short_dir / "boom.tmp", seed=7).rename(drop / "boom.gguf")
        await wait_for(lambda: len(watcher.results) == 1)
        assert "'boom.gguf': refused: internal error" in watcher.results[0]
        write_tiny_llama(short_dir / "fine.tmp", seed=8).rename(drop / "fine.gguf")
        await wait_for(lambda: len(watcher.results) == 2)
        assert "'fine.gguf': added as default@" in watcher.results[1]
        assert watcher.health.startswith(f"watching {drop}")
    finally:
        await watcher.close()
    assert watcher.health == "stopped: the daemon is stopping"
