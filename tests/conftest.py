"""Shared fixtures: tiny GGUF models, configs on short temp sockets, in-process daemons."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_gguf import write_tiny_llama

from sidecar.config import Config, Overrides, load

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SIDECAR_CACHE") or Path.home() / ".cache" / "sidecar") / "models"
SMOLLM2 = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = CACHE / "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory: Unix socket paths must stay under ~100 bytes."""
    d = Path(tempfile.mkdtemp(prefix="sc-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf", seed=1, n_ctx=4096)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    if not SMOLLM2.is_file():
        pytest.fail(f"{SMOLLM2} is missing: run ./scripts/setup (it fetches the demo model)")
    return SMOLLM2


def make_config(
    socket_dir: Path, model: Path, *, env: dict[str, str] | None = None, **overrides: Any
) -> Config:
    """A Config for tests: no user config file, socket in socket_dir, one model."""
    empty = socket_dir / "empty.toml"
    empty.touch()
    overrides.setdefault("socket", socket_dir / "s.sock")
    overrides.setdefault("store", socket_dir / "store")
    o = Overrides(config=empty, model=str(model), **overrides)
    return load(o, env=env or {})


@dataclass
class Served:
    running: Any  # sidecar.app.App
    config: Config
    client: Any  # sidecar.client.AsyncClient

    @property
    def socket(self) -> Path:
        return self.config.server.socket


ServeFactory = Callable[..., Any]


async def start_app(config: Config, slot_kind: str = "process") -> Any:
    """A started daemon (`sidecar.app.App`) in this event loop; stop it with `await app.stop()`."""
    from sidecar.app import App

    app = App(config, slot_kind=slot_kind)
    await app.start()
    return app


@pytest.fixture
async def serve(short_dir: Path) -> AsyncIterator[ServeFactory]:
    """Start a real gRPC daemon in this event loop: `served = await serve(model, slot_kind=...)`."""
    from sidecar.client import AsyncClient

    started: list[Served] = []

    async def start(model: Path, slot_kind: str = "fake", server: dict[str, Any] | None = None,
                    metrics: dict[str, Any] | None = None, http: dict[str, Any] | None = None,
                    update: dict[str, Any] | None = None, model_keys: dict[str, Any] | None = None,
                    cloud: dict[str, Any] | None = None, tasks: tuple[Any, ...] = (),
                    **overrides: Any) -> Served:  # fmt: skip
        config = make_config(short_dir, model, **overrides)
        if cloud:
            config = replace(config, cloud=replace(config.cloud, **cloud))
        if tasks:
            config = replace(config, tasks=tasks)
        if update:
            config = replace(config, update=replace(config.update, **update))
        if model_keys:
            config = replace(config, models=tuple(replace(m, **model_keys) for m in config.models))
        if http:
            config = replace(config, http=replace(config.http, **http))
        if server:
            config = replace(config, server=replace(config.server, **server))
        if metrics:
            config = replace(config, metrics=replace(config.metrics, **metrics))
        running = await start_app(config, slot_kind=slot_kind)
        served = Served(running, config, AsyncClient(config.server.socket))
        started.append(served)
        return served

    yield start
    for s in started:
        await s.client.close()
        if s.running.listening:
            await s.running.stop(grace=0)


@pytest.fixture
async def api(serve, tiny_model: Path, short_dir: Path):  # type: ignore[no-untyped-def]
    """A daemon on tiny llama.cpp with the HTTP API on a Unix socket, and an SDK client."""
    from openai_client import unix_client

    served = await serve(tiny_model, slot_kind="thread", http={"socket": str(short_dir / "h.sock")})
    client = unix_client(short_dir / "h.sock")
    yield served, client
    await client.close()


@pytest.fixture
def keys(tmp_path: Path):  # type: ignore[no-untyped-def]
    """An update-signing key pair: (private key, public key, private key file, public text)."""
    from sidecar.update.manifest import generate_keypair, load_private_key, parse_public_key

    private, public = generate_keypair()
    path = tmp_path / "k.pem"
    path.write_bytes(private)
    return load_private_key(path), parse_public_key(public), path, public
