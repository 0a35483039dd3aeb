"""Signed updates on an encrypted store: the delta rebuild reads the serving version through
decryption and seals the new one as it writes it; after the install nothing in the store
(its update work folder included) holds the GGUF magic or the model's tensor bytes."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import make_config, start_app
from plaintext_scan import plaintext_in, tensor_run
from tiny_gguf import write_tiny_llama
from update_origin import apply, make_origin

from sidecar.client import AsyncClient
from sidecar.fileio import sha256_file
from sidecar.store.sealed import MAGIC

pytestmark = pytest.mark.asyncio

KEY = "5a" * 32


async def _daemon(short_dir: Path, origin):  # type: ignore[no-untyped-def]
    env = {"SIDECAR_STORE_ENCRYPTION": "on", "SIDECAR_STORE_KEY": KEY}
    config = make_config(short_dir, origin.v1, env=env, workers=1)
    keys = {"update_origin": str(origin.root), "update_key": origin.public}
    config = replace(config, models=tuple(replace(m, **keys) for m in config.models))
    return config, await start_app(config, slot_kind="process")


@pytest.mark.parametrize("how", ["delta", "full file"])
async def test_an_update_on_an_encrypted_store_leaves_no_plaintext_in_the_store(
    short_dir: Path, tmp_path: Path, how: str
) -> None:
    v1 = write_tiny_llama(tmp_path / "v1.gguf", seed=18_201, n_ctx=4096, n_embd=96)
    origin = make_origin(tmp_path, v1)
    if how == "full file":  # a delta made from another build: it fails, the full file wins
        other = write_tiny_llama(tmp_path / "other.gguf", seed=18_202, n_embd=96)
        origin.list_delta(origin.make(other, origin.v2).read_bytes())
    config, app = await _daemon(short_dir, origin)
    client = AsyncClient(config.server.socket)
    try:
        steps = await apply(client)
        out = steps[-1].outcome
        assert out.installed, [p.detail for p in steps]
        assert (how == "delta") == out.plan.startswith("delta"), out.plan
        want = sha256_file(origin.v2)[:12]
        assert (await client.generate("hi", max_tokens=2)).model.version == want
        store = config.store.path
        blobs = sorted((store / "blobs").glob("*.gguf"))
        assert len(blobs) == 2 and all(b.read_bytes()[:8] == MAGIC for b in blobs)
        runs = [tensor_run(origin.v1), tensor_run(origin.v2)]
        files = [Path(d) / f for d, _, fs in os.walk(store) for f in fs]
        assert any("updates" in p.parts for p in files)  # the work folder was scanned too
        leaks = [why for p in files if (why := plaintext_in(p, runs))]
        assert leaks == [], leaks
    finally:
        await client.close()
        await app.stop(grace=0)


async def test_a_download_for_an_encrypted_store_is_sealed_as_it_comes(tmp_path: Path) -> None:
    from sidecar.store import ModelStore
    from sidecar.store.keys import Keyring
    from sidecar.update.fetch import Aborted, Control, fetch_file

    model = write_tiny_llama(tmp_path / "m.gguf", seed=18_203, n_embd=256, n_ff=1024)
    store = ModelStore(tmp_path / "store", Keyring(bytes.fromhex(KEY)), encrypt=True)
    size, sha = model.stat().st_size, sha256_file(model)
    part = tmp_path / "work" / "m.full.partial"
    control = Control()
    stop_after = size // 2

    def cut(done: int, _total: int) -> None:
        if done >= stop_after:
            control.cancel("cancelled", "cut")  # half way: what came stays, sealed

    with pytest.raises(Aborted, match="cut"):
        fetch_file(str(model), part, size=size, sha256=sha, progress=cut, control=control,
                   sink=store.download_sink(size), digest_of=store.download_digest)  # fmt: skip
    assert part.read_bytes()[:8] == MAGIC
    assert part.stat().st_size > 2 << 20  # whole chunks were kept, and resumed after
    assert plaintext_in(part, [tensor_run(model)]) is None
    fetch_file(str(model), part, size=size, sha256=sha, sink=store.download_sink(size),
               digest_of=store.download_digest)  # fmt: skip
    assert plaintext_in(part, [tensor_run(model)]) is None
    assert store.add(part, "m", expect_sha256=sha) == sha
