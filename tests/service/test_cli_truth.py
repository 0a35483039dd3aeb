"""The CLI tells the truth about long admin calls, against a real daemon in this loop (real
llama.cpp workers on tiny GGUFs) and the real CLI (CliRunner, in a thread so the daemon's
loop keeps running):

- a swap, once started, runs to its end on the daemon; a client that stops waiting (its
  --timeout, or Ctrl-C) says it detached, exits 4 (130 on Ctrl-C), and the request log
  counts the swap by its real outcome, not CANCELLED;
- `update apply` that is left during the download says the download stopped (exit 5), and
  during the install that it detached (exit 4); Ctrl-C exits 130 after saying which;
- a published version the store already holds is current or gets activated, never INTERNAL;
- `sidecar status` prints each model's last swap and last update.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from tiny_gguf import write_tiny_llama
from trickle import TrickleOrigin
from update_origin import Origin, make_origin, start, wait_for

import sidecar.client
import sidecar.engine.swap
from sidecar.cli.commands import main
from sidecar.cli.support import EXIT_DETACHED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_STOPPED
from sidecar.fileio import sha256_file
from sidecar.update.manifest import generate_keypair
from sidecar.v1 import inference_pb2 as pb

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("m2") / "tiny2.gguf", seed=2, n_ctx=4096)


async def cli(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, main, list(args))


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Holds every swap sequence (after its first progress) until the test opens it."""
    opened = asyncio.Event()
    real = sidecar.engine.swap.switch

    async def held(*args: Any, **kw: Any) -> Any:
        await opened.wait()
        return await real(*args, **kw)

    monkeypatch.setattr(sidecar.engine.swap, "switch", held)
    return opened


class _CtrlC:
    """A streamed call that the user interrupts right after a progress stage in `after`."""

    def __init__(self, call: Any, after: set[str]) -> None:
        self.call, self.after, self.armed = call, after, False

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self.armed:
            raise KeyboardInterrupt
        item = next(self.call)
        self.armed = item.stage in self.after
        return item

    def cancel(self) -> bool:
        return bool(self.call.cancel())


def ctrl_c(monkeypatch: pytest.MonkeyPatch, rpc: str, after: set[str]) -> None:
    class Interrupted(sidecar.client.Client):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            real = getattr(self.admin, rpc)
            setattr(self.admin, rpc, lambda *a, **kw: _CtrlC(real(*a, **kw), after))

    monkeypatch.setattr(sidecar.client, "Client", Interrupted)


async def counters(s: Any, rpc: str) -> dict[str, int]:
    got = (await s.client.status()).counters
    return {k.split(".", 1)[1]: v for k, v in got.items() if k.startswith(rpc + ".")}


# ---------------------------------------------------------------- swap


async def test_a_swap_the_client_stops_waiting_for_detaches_and_completes(
    serve, tiny_model: Path, second_model: Path, gate: asyncio.Event
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model, slot_kind="process", workers=1, context=1024)
    old = (await s.client.status()).models[0].model.version
    out = await cli("swap", str(second_model), "--socket", str(s.socket), "--timeout", "3")
    assert out.exit_code == EXIT_DETACHED, out.output
    assert "detached: the swap is still running on the daemon" in out.output
    assert "sidecar status" in out.output and "refused" not in out.output
    gate.set()

    async def swapped() -> str:
        return (await s.client.status()).models[0].last_swap

    assert (await wait_for(swapped)).startswith(f"{old} -> ")
    new = sha256_file(second_model)[:12]
    assert (await s.client.status()).models[0].model.version == new
    # The request log counts the swap by what happened, once it happened.
    assert await wait_for(lambda: _has(s, "Swap", "OK")) and "CANCELLED" not in await counters(
        s, "Swap"
    )
    # `sidecar status` (text) shows it too.
    text = await cli("status", "--socket", str(s.socket))
    assert text.exit_code == 0 and f"last swap: {old} -> {new}" in text.output, text.output


async def _has(s: Any, rpc: str, status: str) -> bool:
    return status in await counters(s, rpc)


async def test_ctrl_c_during_a_swap_detaches_exits_130_and_a_refusal_is_logged_as_such(
    serve, tiny_model: Path, second_model: Path, gate: asyncio.Event, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model, slot_kind="process", workers=1, context=1024)
    old = (await s.client.status()).models[0].model.version
    pool = s.running.local.pools["default"]
    pool.config = replace(pool.config, canary_prompt="Say hello", canary_expect=r"^\d{40}$")
    ctrl_c(monkeypatch, "Swap", {"adding"})
    out = await cli("swap", str(second_model), "--socket", str(s.socket))
    assert out.exit_code == EXIT_INTERRUPTED, out.output
    assert "detached: the swap is still running on the daemon" in out.output
    assert "Aborted!" not in out.output
    gate.set()

    async def refused() -> str:
        return (await s.client.status()).models[0].last_swap

    assert "refused" in await wait_for(refused)
    assert (await s.client.status()).models[0].model.version == old
    assert await wait_for(lambda: _has(s, "Swap", "FAILED_PRECONDITION"))
    assert "CANCELLED" not in await counters(s, "Swap")
    text = await cli("status", "--socket", str(s.socket))
    assert "last swap: refused" in text.output, text.output


async def test_swap_help_documents_the_exit_codes() -> None:
    out = await cli("swap", "--help")
    assert out.exit_code == 0
    for words in ("4", "detached", "130", "runs to its end"):
        assert words in out.output, words


# ---------------------------------------------------------------- update apply


@pytest.fixture
def origin(tmp_path: Path, tiny_model: Path) -> Origin:
    return make_origin(tmp_path, tiny_model)


async def test_an_apply_left_during_the_download_says_it_stopped(serve, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    with TrickleOrigin(origin.root, trickle=(".delta", ".gguf"), interval=0.5) as o:
        s = await start(serve, origin, o.url, fetch_deadline_seconds=600.0)
        out = await cli("update", "apply", "--socket", str(s.socket), "--timeout", "3")
        assert out.exit_code == EXIT_STOPPED, out.output
        assert "stopped: the download stops; the next `sidecar update apply` resumes" in (
            out.output
        )

        async def idle() -> bool:
            return (await s.client.status()).models[0].update_fetch == ""

        await wait_for(idle, timeout=10)
        # The log says what happened to the work: it was cancelled.
        assert await wait_for(lambda: _has(s, "ApplyUpdate", "CANCELLED"))


async def test_ctrl_c_during_the_install_detaches_and_the_update_completes(
    serve, origin: Origin, gate: asyncio.Event, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    s = await start(serve, origin)
    ctrl_c(monkeypatch, "ApplyUpdate", {"swapping"})
    out = await cli("update", "apply", "--socket", str(s.socket))
    assert out.exit_code == EXIT_INTERRUPTED, out.output
    assert "detached: installing on the daemon; follow it with `sidecar status`" in out.output
    assert "stopped" not in out.output and "Aborted!" not in out.output
    gate.set()
    want = sha256_file(origin.v2)[:12]

    async def serving() -> bool:
        return (await s.client.status()).models[0].model.version == want

    await wait_for(serving)
    assert await wait_for(lambda: _has(s, "ApplyUpdate", "OK"))
    assert "CANCELLED" not in await counters(s, "ApplyUpdate")
    text = await cli("status", "--socket", str(s.socket))
    assert "last update: installed v2" in text.output, text.output


async def test_apply_help_documents_the_exit_codes() -> None:
    out = await cli("update", "apply", "--help")
    assert out.exit_code == 0
    for words in ("4", "detached", "5", "stopped", "130", "resumes"):
        assert words in out.output, words


# ---------------------------------------------------------------- a version already stored


async def test_a_published_version_already_in_the_store_is_activated_not_internal(
    serve, origin: Origin
) -> None:  # type: ignore[no-untyped-def]
    s = await start(serve, origin)
    sock = str(s.socket)
    added = await s.client.admin.AddModel(pb.AddModelRequest(model="default", path=str(origin.v2)))
    want = added.version.sha256[:12]
    check = await s.client.admin.CheckUpdate(pb.UpdateRequest())  # was INTERNAL
    assert check.update_available and check.download_bytes == 0
    assert "in the store" in check.plan
    out = await cli("update", "check", "--socket", sock)
    assert out.exit_code == 0 and "in the store" in out.output, out.output
    out = await cli("update", "apply", "--socket", sock)
    assert out.exit_code == 0, out.output
    assert f"-> v2 ({want})" in out.output
    status = (await s.client.status()).models[0]
    assert status.model.version == want and "installed v2" in status.last_update
    # Now it serves: check and apply say so, and nothing is swapped again.
    out = await cli("update", "check", "--socket", sock)
    assert out.exit_code == 0 and "up to date (v2)" in out.output, out.output
    out = await cli("update", "apply", "--socket", sock)
    assert out.exit_code == 0 and "up to date (v2)" in out.output, out.output


async def test_status_text_shows_a_failed_update(serve, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    s = await start(serve, origin)
    origin.key.write_bytes(generate_keypair()[0])  # a key the daemon does not trust
    origin.publish(3, origin.v2)
    out = await cli("update", "apply", "--socket", str(s.socket))
    assert out.exit_code == EXIT_FAILED, out.output
    text = await cli("status", "--socket", str(s.socket))
    assert "last update: rejected" in text.output, text.output
