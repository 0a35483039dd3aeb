"""`store.drop_remove_plaintext` through a real daemon (App, process workers on tiny GGUFs)
on a plain and on an encrypted store: true deletes every dropped file once it is imported
or refused; false keeps it, moved into the drop folder's `.imported/` or `.refused/`
(collisions get a free name), and a kept file is never taken again, not even by a
watcher started afresh. A file the swap itself refuses (stored, then its canary failed)
is kept in `.refused/` with one quarantine record, by the setting read when it was taken."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import make_config, start_app  # type: ignore[import-not-found]
from tiny_gguf import write_tiny_llama
from tiny_lora import write_lora

from sidecar.client import AsyncClient
from sidecar.dropwatch import DropWatcher

pytestmark = pytest.mark.asyncio

KEY = {"SIDECAR_STORE_ENCRYPTION": "on", "SIDECAR_STORE_KEY": "7a" * 32}


async def _until(cond: Callable[[], bool], what: object, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, what
        await asyncio.sleep(0.05)


def _drop(src: Path, dest: Path) -> None:
    """Copy under a dot-name, then rename into place: a complete file appears at once."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    hidden = dest.with_name("." + dest.name)
    shutil.copyfile(src, hidden)
    hidden.rename(dest)


def _plain_gguf_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.read_bytes()[:4] == b"GGUF"]


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("remove", [True, False], ids=["remove", "keep"])
async def test_dropped_files_are_removed_or_kept_aside_and_never_taken_twice(
    short_dir: Path, tiny_model: Path, remove: bool, encrypted: bool
) -> None:
    drop = short_dir / "drop"
    models = short_dir / "src"
    models.mkdir()
    second = write_tiny_llama(models / "second.gguf", seed=18_302, n_ctx=4096)
    lora = write_lora(models / "tickets.gguf", tiny_model, std=0.3)
    config = make_config(short_dir, tiny_model, env=KEY if encrypted else None, workers=1,
                         context=512)  # fmt: skip
    config = replace(
        config,
        store=replace(config.store, drop=drop, auto_swap=True, drop_remove_plaintext=remove),
    )
    app = await start_app(config)
    client = AsyncClient(config.server.socket)
    store = app.local.store
    try:
        assert app.drop is not None and app.drop.remove_plaintext is remove
        results = app.drop.results
        first = (await client.status()).models[0].model.version
        _drop(second, drop / "next.gguf")
        await _until(lambda: len(results) == 1, results)
        assert "default now serves" in results[0], results
        now = (await client.status()).models[0].model.version
        assert now != first
        _drop(lora, drop / "default" / "tickets.gguf")
        (drop / "default" / "bad.gguf").write_bytes(b"not a model\n" * 100)
        await _until(lambda: len(results) == 3, results)
        outcomes = " | ".join(results)
        assert "default:tickets now serves" in outcomes, outcomes
        assert "'bad.gguf': refused: " in outcomes, outcomes
        reply = await client.generate("Hello w", max_tokens=2, adapter="tickets")
        assert reply.adapter.name == "tickets"
        # The same file under the same name once more: stored already, and (kept) a new name.
        _drop(second, drop / "next.gguf")
        await _until(lambda: len(results) == 4, results)
        assert "default now serves" in results[3], results
        reasons = list(store.quarantine_dir.glob("*bad.gguf.reason"))
        assert len(reasons) == 1 and "not a GGUF file" in reasons[0].read_text()
        left = sorted(str(p.relative_to(drop)) for p in drop.rglob("*") if p.is_file())
        if remove:
            assert left == [], left
            # Refused: set aside in the quarantine, sealed on an encrypted store.
            copies = list(store.quarantine_dir.glob("*bad.gguf"))
            assert len(copies) == 1
            assert (copies[0].read_bytes()[:11] == b"not a model") is not encrypted
        else:
            assert left == [".imported/default/tickets.gguf", ".imported/next.1.gguf",
                            ".imported/next.gguf", ".refused/default/bad.gguf"], left  # fmt: skip
            assert (drop / ".imported" / "next.gguf").read_bytes() == second.read_bytes()
            assert (drop / ".imported" / "next.1.gguf").read_bytes() == second.read_bytes()
            assert (drop / ".imported/default/tickets.gguf").read_bytes() == lora.read_bytes()
            assert "kept as .refused/default/bad.gguf" in outcomes, outcomes
            # The file is in the drop folder: the quarantine keeps the reason only.
            assert not list(store.quarantine_dir.glob("*bad.gguf"))
            assert "not copied" in reasons[0].read_text()
            # Never taken again: neither by this watcher nor one started afresh (which
            # looks at everything already in the folder).
            await asyncio.sleep(2.0)
            assert len(results) == 4, results
            again = DropWatcher(app.local, drop, auto_swap=True, remove_plaintext=False)
            await again.start()
            try:
                await asyncio.sleep(2.0)
                assert again.results == []
            finally:
                await again.close()
            assert (await client.status()).models[0].model.version == now
        if encrypted:  # plaintext is only where the operator asked to keep it
            assert _plain_gguf_files(store.root) == []
        kept = _plain_gguf_files(drop)
        assert len(kept) == (0 if remove else 3)
        assert (await client.generate("still", max_tokens=1)).text is not None
    finally:
        await client.close()
        await app.stop()


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
async def test_a_kept_file_the_swap_refuses_is_kept_aside_with_one_quarantine_record(
    short_dir: Path, tiny_model: Path, encrypted: bool
) -> None:
    # Stored fine, then refused by the swap itself (its canary): the swap records the
    # reason (its copy set aside from the store), the drop folder keeps the file.
    drop = short_dir / "drop"
    second = write_tiny_llama(short_dir / "second.gguf", seed=18_302, n_ctx=4096)
    config = make_config(short_dir, tiny_model, env=KEY if encrypted else None, workers=1,
                         context=512)  # fmt: skip
    config = replace(
        config,
        store=replace(config.store, drop=drop, auto_swap=True, drop_remove_plaintext=False),
        models=tuple(replace(m, canary_expect="^never this$") for m in config.models),
    )
    app = await start_app(config)
    client = AsyncClient(config.server.socket)
    store = app.local.store
    try:
        assert app.drop is not None
        results = app.drop.results
        first = (await client.status()).models[0].model.version
        _drop(second, drop / "next.gguf")
        # A reload during the swap changes the setting: this file keeps the one it was
        # taken with, refusal included.
        await _until(lambda: app.local.swapper.busy("default"), "the swap")
        app.drop.remove_plaintext = True
        await _until(lambda: len(results) == 1, results)
        assert "'next.gguf': refused: " in results[0], results
        assert "does not match" in results[0] and "kept as .refused/next.gguf" in results[0]
        left = sorted(str(p.relative_to(drop)) for p in drop.rglob("*") if p.is_file())
        assert left == [".refused/next.gguf"], left
        assert (drop / ".refused" / "next.gguf").read_bytes() == second.read_bytes()
        reasons = list(store.quarantine_dir.glob("*.reason"))
        assert len(reasons) == 1, reasons
        assert "does not match" in reasons[0].read_text()
        if encrypted:  # the swap's copy is the sealed blob: no plaintext in the store
            assert _plain_gguf_files(store.root) == []
        await asyncio.sleep(1.5)  # never taken again
        assert len(results) == 1, results
        assert (await client.status()).models[0].model.version == first
        assert (await client.generate("still", max_tokens=1)).text is not None
    finally:
        await client.close()
        await app.stop()
