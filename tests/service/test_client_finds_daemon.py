"""A real daemon on a temp socket, found with no socket argument: by `Client()` through
SIDECAR_SERVER_SOCKET or the config file, and by `sidecar status` through a full server
config whose server-only secrets live elsewhere."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from click.testing import CliRunner

from sidecar import config as cfgmod
from sidecar.cli.commands import main
from sidecar.client import AsyncClient, Client


@pytest.fixture
def no_default_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(cfgmod, "SYSTEM_CONFIG", tmp_path / "etc" / "config.toml")
    for var in ("SIDECAR_CONFIG", "SIDECAR_SERVER_SOCKET", "SIDECAR_SERVER_TCP_TOKEN"):
        monkeypatch.delenv(var, raising=False)


async def test_clients_without_a_socket_find_the_daemon_as_the_cli_does(
    serve,
    tiny_model: Path,
    tmp_path: Path,
    no_default_configs: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model)
    monkeypatch.setenv("SIDECAR_SERVER_SOCKET", str(s.socket))
    async with AsyncClient() as c:
        assert (await c.status()).pid == (await s.client.status()).pid

    monkeypatch.delenv("SIDECAR_SERVER_SOCKET")
    full = tmp_path / "full.toml"
    # The service's file: http.token and the cloud key are in its environment, not here.
    full.write_text(
        f'[server]\nsocket = "{s.socket}"\n[http]\nport = 8080\n'
        '[models.demo]\npath = "/srv/models/demo.gguf"\n'
    )
    monkeypatch.setenv("SIDECAR_CONFIG", str(full))

    def blocking() -> str:
        with Client(timeout=10) as c:
            return c.health("sidecar.v1.Inference")

    assert await asyncio.to_thread(blocking) == "SERVING"
    monkeypatch.delenv("SIDECAR_CONFIG")
    for args in (["--config", str(full), "status"], ["status", "--config", str(full)]):
        out = await asyncio.to_thread(CliRunner().invoke, main, args)
        assert out.exit_code == 0, out.output
        assert f"on {s.socket}" in out.output and "SERVING" in out.output
