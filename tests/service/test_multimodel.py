"""Several named models in one daemon, each with its own workers and context."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from conftest import start_app
from tiny_gguf import write_tiny_llama

from sidecar.client import AsyncClient
from sidecar.config import Overrides, load

pytestmark = pytest.mark.asyncio


async def test_two_named_models_with_their_own_settings(short_dir: Path) -> None:
    a = write_tiny_llama(short_dir / "a.gguf", seed=11, n_ctx=4096)
    b = write_tiny_llama(short_dir / "b.gguf", seed=12, n_ctx=4096)
    cfg = short_dir / "c.toml"
    cfg.write_text(
        f"""
default_model = "chat"
[server]
socket = "{short_dir / "s.sock"}"
[store]
path = "{short_dir / "store"}"
[models.classifier]
path = "{a}"
workers = 1
context = 512
[models.chat]
path = "{b}"
workers = 2
context = 1024
"""
    )
    config = load(Overrides(config=cfg), env={})
    running = await start_app(config)
    client = AsyncClient(config.server.socket)
    try:
        st = {m.model.name: m for m in (await client.status()).models}
        assert set(st) == {"classifier", "chat"}
        assert (len(st["classifier"].workers), st["classifier"].context) == (1, 512)
        assert (len(st["chat"].workers), st["chat"].context) == (2, 1024)
        assert st["chat"].is_default and not st["classifier"].is_default
        assert st["chat"].model.version != st["classifier"].model.version
        default = await client.generate("hi", max_tokens=2)
        assert default.model == st["chat"].model
        named = await client.classify("x", ["p", "q"], model="classifier")
        assert named.model == st["classifier"].model
        for name in ("classifier", "chat"):
            assert await client.health(f"sidecar.v1.Inference/{name}") == "SERVING"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.generate("hi", model="summariser")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "loaded: chat, classifier" in (e.value.details() or "")
    finally:
        await client.close()
        await running.stop()
