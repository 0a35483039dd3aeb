"""The Python clients against a real daemon on a real socket: typed errors, retries that
help (a full queue, a daemon not started or still loading) and retries that must not
happen (a stream that has yielded, a bad request), and every admin method, blocking and
asyncio alike."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import make_config, start_app
from update_origin import make_origin

from sidecar.client import (
    AsyncClient,
    Client,
    FailedPreconditionError,
    InvalidRequestError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from sidecar.engine.fake import FakeSlot

pytestmark = pytest.mark.asyncio


async def counters(c: AsyncClient, rpc: str) -> dict[str, int]:
    got = (await c.status()).counters
    return {k.split(".", 1)[1]: v for k, v in got.items() if k.startswith(rpc + ".")}


# ---------------------------------------------------------------- errors


async def test_refusals_raise_typed_errors_with_the_daemons_request_id(
    serve, tiny_model: Path
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model)
    with pytest.raises(InvalidRequestError) as bad:
        await s.client.generate("")
    assert bad.value.reason == "invalid_argument" and "prompt is empty" in bad.value.message
    assert bad.value.request_id and len(bad.value.request_id) == 12
    with pytest.raises(NotFoundError) as missing:
        await s.client.classify("x", ["a", "b"], model="nope")
    assert missing.value.reason == "not_found" and "nope" in missing.value.message
    with pytest.raises(FailedPreconditionError) as no_cloud:
        await s.client.chat([("user", "hi")], routing="CLOUD_ONLY")
    assert no_cloud.value.reason == "failed_precondition"

    def blocking() -> InvalidRequestError:
        with Client(s.socket) as c, pytest.raises(InvalidRequestError) as e:
            c.embed([""])
        return e.value

    e = await asyncio.to_thread(blocking)
    assert e.request_id and e.message


async def test_a_client_with_no_daemon_gets_unavailable_without_a_request_id(
    short_dir: Path,
) -> None:
    async with AsyncClient(short_dir / "nobody.sock") as c:
        with pytest.raises(UnavailableError) as e:
            await c.status(timeout=2)
    assert e.value.request_id is None and e.value.reason == "unavailable"


# ---------------------------------------------------------------- retries that help


@pytest.fixture
async def full_queue(serve, tiny_model: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A daemon with one worker and max_queue 1, both taken by slow requests for ~1 s."""
    monkeypatch.setattr(FakeSlot, "token_delay_s", 0.01)
    s = await serve(tiny_model, workers=1, model_keys={"max_queue": 1})
    busy = [asyncio.ensure_future(s.client.generate("w", max_tokens=50)) for _ in range(2)]
    while (await s.client.status()).models[0].queue_depth < 1:
        await asyncio.sleep(0.005)
    yield s
    await asyncio.gather(*busy)


async def test_a_full_queue_refuses_at_once_without_retries_and_serves_with_them(
    full_queue,
) -> None:  # type: ignore[no-untyped-def]
    s = full_queue
    with pytest.raises(ResourceExhaustedError) as e:
        await s.client.generate("x", max_tokens=1)
    assert e.value.reason == "resource_exhausted"
    async with AsyncClient(s.socket, retries=30, backoff_s=0.02, backoff_max_s=0.1) as patient:
        reply = await patient.generate("served at last", max_tokens=3)
    assert reply.text == "served at last "
    # Refused on the way, then served: the daemon saw the retries.
    seen = await counters(s.client, "Generate")
    assert seen["RESOURCE_EXHAUSTED"] >= 2 and seen["OK"] >= 1


async def test_a_stream_refused_before_its_first_message_is_retried(full_queue) -> None:  # type: ignore[no-untyped-def]
    s = full_queue

    def blocking() -> list[Any]:
        with Client(s.socket, retries=30, backoff_s=0.02, backoff_max_s=0.1) as c:
            return list(c.generate_stream("a b", max_tokens=2))

    chunks = await asyncio.to_thread(blocking)
    assert "".join(ch.text for ch in chunks) == "a b "  # each piece once
    assert chunks[-1].summary.usage.completion_tokens == 2
    assert (await counters(s.client, "GenerateStream"))["RESOURCE_EXHAUSTED"] >= 1


async def test_a_client_started_before_its_daemon_waits_for_it_to_listen_and_load(
    short_dir: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loading = asyncio.Event()
    real_start = FakeSlot.start

    async def slow_start(self: FakeSlot) -> Any:
        await loading.wait()
        return await real_start(self)

    monkeypatch.setattr(FakeSlot, "start", slow_start)
    config = make_config(short_dir, tiny_model)

    def blocking() -> str:
        with Client(config.server.socket, retries=40, backoff_s=0.05, backoff_max_s=0.2) as c:
            return c.generate("up now", max_tokens=2, timeout=5).text

    asked = asyncio.ensure_future(asyncio.to_thread(blocking))
    await asyncio.sleep(0.4)  # refused: nothing listens on the socket
    assert not asked.done()
    starting = asyncio.ensure_future(start_app(config, "fake"))
    while not config.server.socket.exists():
        await asyncio.sleep(0.01)
    async with AsyncClient(config.server.socket) as c:
        with pytest.raises(UnavailableError, match="no live worker"):  # listening, not loaded
            await c.generate("x", timeout=2)
        await asyncio.sleep(0.3)
        assert not asked.done()
        loading.set()
        app = await starting
        try:
            assert await asyncio.wait_for(asked, 20) == "up now "
            assert (await counters(c, "Generate"))["UNAVAILABLE"] >= 2  # ours and its retries
        finally:
            await app.stop(grace=0)


# ---------------------------------------------------------------- retries that must not happen


async def test_a_request_the_daemon_refuses_as_invalid_is_sent_once(
    serve, tiny_model: Path
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model)
    async with AsyncClient(s.socket, retries=5, backoff_s=0.01) as c:
        with pytest.raises(InvalidRequestError):
            await c.classify("x", ["only one label"])
        with pytest.raises(NotFoundError):
            await c.generate("x", model="nope")
    assert await counters(s.client, "Classify") == {"INVALID_ARGUMENT": 1}
    assert await counters(s.client, "Generate") == {"NOT_FOUND": 1}


async def test_a_stream_that_has_yielded_is_never_retried(serve, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model, slot_kind="process", workers=1, context=512)
    pid = (await s.client.status()).models[0].workers[0].pid
    async with AsyncClient(s.socket, retries=5, backoff_s=0.01) as c:
        stream = c.generate_stream("crash me", max_tokens=400)
        first = await stream.read()
        assert first.text
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(UnavailableError) as e:  # the worker's death: retryable, but not here
            async for _ in stream:
                pass
    assert "exited" in e.value.message
    assert await counters(s.client, "GenerateStream") == {"UNAVAILABLE": 1}


# ---------------------------------------------------------------- admin methods


async def test_every_admin_method_works_blocking_and_asyncio(
    serve, tiny_model: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    origin = make_origin(tmp_path, tiny_model)
    s = await serve(
        origin.v1, model_keys={"update_origin": str(origin.root), "update_key": origin.public}
    )
    c: AsyncClient = s.client

    assert (await c.status()).models[0].ready
    assert [m.model.name for m in (await c.list_models()).models] == ["default"]
    check = await c.check_update()
    assert check.update_available and (check.installed_version, check.available_version) == (1, 2)
    stages: list[str] = []
    outcome = await c.apply_update(on_progress=lambda p: stages.append(p.stage))
    assert outcome.installed and outcome.to_version == 2 and stages[-1] == "done"
    v2 = outcome.new_version
    assert (await c.status()).models[0].model.version == v2

    def blocking() -> tuple[Any, ...]:
        with Client(s.socket, timeout=30) as b:
            seen: list[str] = []
            back = b.swap(path=origin.v1, on_progress=lambda p: seen.append(p.stage))
            added = b.add_model(origin.v2, name="other")
            versions = b.list_versions()
            b.remove_version("other", added.version.sha256[:12])
            return back, seen, added, versions, b.list_versions(), b.check_update()

    back, seen, added, versions, after, check = await asyncio.to_thread(blocking)
    assert back.finished and back.ok and back.old.version == v2 and back.new.version != v2
    assert seen[0] == "adding" and seen[-1] == "done"
    assert added.version.model == "other" and added.version.sha256.startswith(v2)
    assert ("other", True) in {(v.model, v.sha256.startswith(v2)) for v in versions.versions}
    assert "other" not in {v.model for v in after.versions}
    assert check.installed_version == 1 and check.update_available
    # The stream forms yield every step; a refused swap raises its class.
    steps = [p async for p in c.swap_stream(version=v2)]
    assert steps[-1].finished and steps[-1].new.version == v2
    with pytest.raises(NotFoundError):
        await c.swap(version="0" * 12)
    removed = await c.collect_garbage(empty_quarantine=True)
    assert isinstance(list(removed.removed), list)
    assert [p.stage async for p in c.apply_update_stream()][-1] == "done"  # up to date: one step
