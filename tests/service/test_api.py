"""The real gRPC server on a real Unix socket, with fake slots (no llama.cpp): translation,
error mapping, admission control, cancellation, auth, socket handling, health, reflection."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import grpc
import pytest
from conftest import start_app
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sidecar.client import AsyncClient
from sidecar.engine.fake import FakeSlot
from sidecar.socket_claim import SocketBusy
from sidecar.v1 import inference_pb2 as pb

pytestmark = pytest.mark.asyncio

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}}}


async def read_rest(call: grpc.aio.UnaryStreamCall) -> list[pb.GenerateChunk]:
    out = []
    while (chunk := await call.read()) is not grpc.aio.EOF:
        out.append(chunk)
    return out


async def code_of(awaitable: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await awaitable  # type: ignore[misc]
    return e.value.code(), e.value.details() or ""


async def test_every_rpc_answers_and_names_the_model_version(serve, tiny_model: Path) -> None:
    s = await serve(tiny_model)
    c = s.client
    gen = await c.generate("one two three", max_tokens=4)
    assert gen.text == "one two three one "
    assert gen.model.name == "default" and len(gen.model.version) == 12
    assert gen.usage.completion_tokens == 4
    assert gen.timings.total_ms >= gen.timings.queue_ms >= 0
    assert gen.confidence.min_logprob <= gen.confidence.mean_logprob
    chat = await c.chat([("system", "be brief"), ("user", "hello there")], max_tokens=2)
    assert chat.text == "hello there "
    cls = await c.classify("card stolen", ["stolen card", "xyz"])
    assert cls.label == "stolen card"
    assert [x.label for x in cls.scores] == ["stolen card", "xyz"]
    assert abs(sum(x.probability for x in cls.scores) - 1) < 1e-9
    assert cls.confidence.margin == pytest.approx(
        cls.scores[0].probability - cls.scores[1].probability
    )
    ext = await c.extract("Ann is 3", SCHEMA)
    assert set(json.loads(ext.json)) == {"name", "n"}
    emb = await c.embed(["a", "b"])
    assert len(emb.embeddings) == 2 and len(emb.embeddings[0].values) == 8


async def test_stream_sends_pieces_then_a_summary_with_the_whole_text(
    serve, tiny_model: Path
) -> None:
    s = await serve(tiny_model)
    chunks = [c async for c in s.client.generate_stream("a b", max_tokens=3)]
    assert [c.text for c in chunks[:-1]] == ["a ", "b ", "a "]
    assert chunks[-1].HasField("summary")
    assert chunks[-1].summary.text == "a b a "
    assert chunks[-1].summary.model.name == "default"


BAD_REQUESTS = [
    (
        "Generate",
        pb.GenerateRequest(prompt=""),
        grpc.StatusCode.INVALID_ARGUMENT,
        "prompt is empty",
    ),
    (
        "Generate",
        pb.GenerateRequest(prompt="x", max_tokens=-5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_tokens",
    ),
    (
        "Generate",
        pb.GenerateRequest(prompt="x", max_tokens=-1),  # 0 = the server default
        grpc.StatusCode.INVALID_ARGUMENT,
        "at least 1",
    ),
    (
        "Generate",
        pb.GenerateRequest(prompt="x", max_tokens=10**9),
        grpc.StatusCode.OUT_OF_RANGE,
        "context window",
    ),
    ("Chat", pb.ChatRequest(), grpc.StatusCode.INVALID_ARGUMENT, "messages is empty"),
    ("Classify", pb.ClassifyRequest(text="x"), grpc.StatusCode.INVALID_ARGUMENT, "at least 2"),
    (
        "Classify",
        pb.ClassifyRequest(text="x", labels=["a", "a"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "twice",
    ),
    (
        "Classify",
        pb.ClassifyRequest(text="x", labels=["a", " "]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "empty",
    ),
    (
        "Classify",
        pb.ClassifyRequest(text="x", labels=[str(i) for i in range(5000)]),
        grpc.StatusCode.OUT_OF_RANGE,
        "at most",
    ),
    (
        "Extract",
        pb.ExtractRequest(text="x", json_schema="{"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not valid JSON",
    ),
    (
        "Extract",
        pb.ExtractRequest(text="x", json_schema='{"type": 3}'),
        grpc.StatusCode.INVALID_ARGUMENT,
        "JSON Schema",
    ),
    ("Embed", pb.EmbedRequest(), grpc.StatusCode.INVALID_ARGUMENT, "texts is empty"),
    (
        "Generate",
        pb.GenerateRequest(prompt="x", model="nope"),
        grpc.StatusCode.NOT_FOUND,
        "no model named 'nope'",
    ),
    (
        "Classify",
        pb.ClassifyRequest(text="x", labels=["a", "b"], model="nope"),
        grpc.StatusCode.NOT_FOUND,
        "loaded: default",
    ),
]


@pytest.mark.parametrize(
    ("rpc", "request_", "code", "says"), BAD_REQUESTS, ids=[f"{r[0]}-{r[3]}" for r in BAD_REQUESTS]
)
async def test_bad_input_gets_its_status_and_the_daemon_keeps_serving(
    serve, tiny_model: Path, rpc: str, request_: object, code: grpc.StatusCode, says: str
) -> None:
    s = await serve(tiny_model)
    got, details = await code_of(getattr(s.client.inference, rpc)(request_))
    assert got == code
    assert says in details
    assert (await s.client.generate("still fine", max_tokens=1)).text == "still "


async def test_invalid_utf8_in_a_string_field_is_invalid_argument(serve, tiny_model: Path) -> None:
    s = await serve(tiny_model)
    raw = s.client.channel.unary_unary("/sidecar.v1.Inference/Generate")
    # field 2 (prompt), length 2, bytes that are not UTF-8
    got, details = await code_of(raw(b"\x12\x02\xff\xfe"))
    assert got == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in details
    assert (await s.client.generate("ok", max_tokens=1)).text == "ok "


async def test_oversized_message_is_refused_and_the_daemon_keeps_serving(
    serve, tiny_model: Path
) -> None:
    s = await serve(tiny_model, server={"max_message_bytes": 64 * 1024})
    got, details = await code_of(s.client.generate("x" * 100_000))
    assert got == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in details
    assert (await s.client.generate("ok", max_tokens=1)).text == "ok "


async def test_full_queue_answers_resource_exhausted_at_once(
    serve, tiny_model: Path, monkeypatch
) -> None:
    monkeypatch.setattr(FakeSlot, "token_delay_s", 0.05)
    s = await serve(tiny_model, workers=1)
    pool = s.running.local.pools["default"]  # type: ignore[attr-defined]
    pool._queue.limit = 2
    busy = [asyncio.ensure_future(s.client.generate("a", max_tokens=20)) for _ in range(3)]
    for _ in range(200):
        if len(pool._queue) >= 2:
            break
        await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    got, details = await code_of(s.client.generate("b", max_tokens=1))
    assert got == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue" in details
    assert loop.time() - t0 < 0.5  # refused without waiting for a worker
    await asyncio.gather(*busy)


async def test_callers_are_served_round_robin(serve, tiny_model: Path, monkeypatch) -> None:
    monkeypatch.setattr(FakeSlot, "token_delay_s", 0.02)
    s = await serve(tiny_model, workers=1)
    busy_app = AsyncClient(s.socket, caller="busy-app")
    other_app = AsyncClient(s.socket, caller="other-app")
    order: list[str] = []

    async def call(client: AsyncClient, tag: str) -> None:
        await client.generate(tag, max_tokens=3)
        order.append(tag)

    burst = [asyncio.ensure_future(call(busy_app, f"busy{i}")) for i in range(5)]
    await asyncio.sleep(0.02)  # the burst is queued first
    late = asyncio.ensure_future(call(other_app, "other"))
    await asyncio.gather(*burst, late)
    # Without fairness "other" would finish last, behind the whole burst.
    assert order.index("other") <= 2, order
    await busy_app.close()
    await other_app.close()


async def test_cancelled_stream_frees_the_worker(serve, tiny_model: Path, monkeypatch) -> None:
    monkeypatch.setattr(FakeSlot, "token_delay_s", 0.01)
    s = await serve(tiny_model, workers=1)
    pool = s.running.local.pools["default"]  # type: ignore[attr-defined]
    call = s.client.generate_stream("w", max_tokens=512)
    seen = 0
    async for _ in call:
        seen += 1
        if seen == 3:
            break
    call.cancel()
    await asyncio.sleep(0.1)
    made = pool._slots[0].tokens_made
    assert made < 20, f"the worker kept decoding after the cancel ({made} tokens)"
    reply = await s.client.generate("next", max_tokens=1, timeout=2)
    assert reply.text == "next "


async def test_deadline_stops_the_work_and_answers_deadline_exceeded(
    serve, tiny_model: Path, monkeypatch
) -> None:
    monkeypatch.setattr(FakeSlot, "token_delay_s", 0.01)
    s = await serve(tiny_model, workers=1)
    pool = s.running.local.pools["default"]  # type: ignore[attr-defined]
    got, _ = await code_of(s.client.generate("w", max_tokens=1000, timeout=0.2))
    assert got == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.sleep(0.1)
    assert pool._slots[0].tokens_made < 60
    assert (await s.client.generate("x", max_tokens=1, timeout=2)).text == "x "


async def test_health_reports_process_and_readiness(serve, tiny_model: Path) -> None:
    s = await serve(tiny_model)
    assert await s.client.health("") == "SERVING"
    assert await s.client.health("sidecar.v1.Inference") == "SERVING"
    assert await s.client.health("sidecar.v1.Inference/default") == "SERVING"
    got, _ = await code_of(s.client.health("no.such.Service"))
    assert got == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_the_services(serve, tiny_model: Path) -> None:
    s = await serve(tiny_model)
    stub = reflection_pb2_grpc.ServerReflectionStub(s.client.channel)
    replies = [
        r
        async for r in stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
    ]
    names = {svc.name for svc in replies[0].list_services_response.service}
    assert {"sidecar.v1.Inference", "sidecar.v1.Admin", "grpc.health.v1.Health"} <= names


async def test_status_shows_models_workers_and_counters(serve, tiny_model: Path) -> None:
    s = await serve(tiny_model, workers=2)
    await s.client.generate("x", max_tokens=1)
    await code_of(s.client.generate(""))
    st = await s.client.status()
    assert st.pid == os.getpid()
    (m,) = st.models
    assert m.model.name == "default" and m.ready and m.is_default
    assert len(m.workers) == 2
    assert st.counters["Generate.OK"] == 1
    assert st.counters["Generate.INVALID_ARGUMENT"] == 1


def free_port() -> int:
    import socket as pysocket

    with pysocket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_tcp_is_off_by_default(serve, tiny_model: Path) -> None:
    s = await serve(tiny_model)
    assert s.running.grpc.tcp_port is None


async def test_tcp_listener_needs_the_bearer_token(serve, tiny_model: Path) -> None:
    port = free_port()
    s = await serve(tiny_model, server={"tcp_port": port, "tcp_token": "s3cret"})
    assert s.running.grpc.tcp_port == port
    for token in ("", "wrong"):  # "" sends none (None would read the config)
        c = AsyncClient(tcp=f"127.0.0.1:{port}", token=token)
        got, details = await code_of(c.generate("x", max_tokens=1))
        assert got == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in details
        await c.close()
    good = AsyncClient(tcp=f"127.0.0.1:{port}", token="s3cret")
    assert (await good.generate("x", max_tokens=1)).text == "x "
    await good.close()
    # the Unix socket needs no token: file permissions guard it
    assert (await s.client.generate("y", max_tokens=1)).text == "y "


async def test_socket_is_private_by_default(serve, tiny_model: Path) -> None:
    s = await serve(tiny_model)
    assert stat.S_IMODE(s.socket.stat().st_mode) == 0o600
    assert stat.S_ISSOCK(s.socket.stat().st_mode)


async def test_socket_group_access_gives_0660(serve, tiny_model: Path) -> None:
    s = await serve(tiny_model, server={"socket_group_access": True})
    assert stat.S_IMODE(s.socket.stat().st_mode) == 0o660


async def test_second_daemon_on_the_same_socket_is_refused(serve, tiny_model: Path) -> None:
    s = await serve(tiny_model)
    # A copy into the store in flight (`models add`, a drop, an update install) looks like
    # what a crash leaves: only the daemon holding the socket may sweep it.
    in_flight = s.config.store.path / "blobs" / ".4242-1.partial"
    in_flight.write_bytes(b"half a model")
    with pytest.raises(SocketBusy, match="already serving"):
        await start_app(s.config, slot_kind="fake")
    assert in_flight.read_bytes() == b"half a model"
    assert (await s.client.generate("ok", max_tokens=1)).text == "ok "


async def test_a_restarted_daemon_sweeps_the_partial_copies_a_crash_left(
    serve, tiny_model: Path
) -> None:
    s = await serve(tiny_model)
    left = s.config.store.path / "blobs" / ".4242-1.partial"
    left.write_bytes(b"half a model")
    await s.running.stop(grace=0)
    await serve(tiny_model)
    assert not left.exists()


async def test_an_http_listener_that_cannot_start_leaves_nothing_listening(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    blocker = short_dir / "h.sock"
    blocker.mkdir()  # the HTTP socket's path is taken by a directory: it cannot bind
    with pytest.raises(Exception):  # noqa: B017 - whatever the bind raises; the state matters
        await serve(tiny_model, http={"socket": str(blocker)})
    assert not (short_dir / "s.sock").exists()  # the gRPC socket was released too
    blocker.rmdir()
    s = await serve(tiny_model)  # and the next start claims it as its own
    assert (await s.client.generate("ok", max_tokens=1)).text == "ok "


async def test_stale_socket_file_is_reclaimed(serve, tiny_model: Path, short_dir: Path) -> None:
    import socket as pysocket

    stale = short_dir / "s.sock"
    sock = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    sock.bind(str(stale))  # bound but never listening: what a killed daemon leaves
    sock.close()
    assert stale.exists()
    s = await serve(tiny_model)
    assert s.socket == stale
    assert (await s.client.generate("ok", max_tokens=1)).text == "ok "


async def test_shutdown_finishes_inflight_refuses_new_and_removes_socket(
    serve, tiny_model: Path, monkeypatch
) -> None:
    monkeypatch.setattr(FakeSlot, "token_delay_s", 0.01)
    s = await serve(tiny_model, workers=1)
    stream = s.client.generate_stream("w", max_tokens=40)
    first = await stream.read()
    assert first.text
    stopping = asyncio.ensure_future(s.running.stop())
    await asyncio.sleep(0.05)
    rest = await read_rest(stream)
    assert rest[-1].HasField("summary")
    assert rest[-1].summary.usage.completion_tokens == 40
    await stopping
    assert not s.socket.exists()
    late = AsyncClient(s.socket)
    got, _ = await code_of(late.generate("x", timeout=1))
    assert got == grpc.StatusCode.UNAVAILABLE
    await late.close()


async def test_health_goes_not_serving_while_draining(serve, tiny_model: Path, monkeypatch) -> None:
    monkeypatch.setattr(FakeSlot, "token_delay_s", 0.02)
    s = await serve(tiny_model, workers=1)
    stream = s.client.generate_stream("w", max_tokens=30)
    await stream.read()
    stopping = asyncio.ensure_future(s.running.stop())
    await asyncio.sleep(0.05)
    reply = await s.running.grpc.health.Check(
        health_pb2.HealthCheckRequest(service="sidecar.v1.Inference"), None
    )
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await read_rest(stream)
    await stopping


BURST = """
import sys, concurrent.futures as cf
from sidecar.client import Client
with Client(sys.argv[1]) as c, cf.ThreadPoolExecutor(6) as ex:
    list(ex.map(lambda i: c.generate(f"burst{i}", max_tokens=3), range(6)))
"""


async def test_processes_are_told_apart_by_kernel_credentials(
    serve, tiny_model: Path, monkeypatch
) -> None:
    """No metadata: a busy process's burst must not delay another process's request."""
    import sys

    monkeypatch.setattr(FakeSlot, "token_delay_s", 0.03)
    s = await serve(tiny_model, workers=1)
    pool = s.running.local.pools["default"]  # type: ignore[attr-defined]
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", BURST, str(s.socket))
    for _ in range(500):
        if len(pool._queue) >= 4:
            break
        await asyncio.sleep(0.01)
    assert len(pool._queue) >= 4
    reply = await s.client.generate("mine", max_tokens=3)
    assert reply.text == "mine mine mine "
    # Round-robin: ours ran right after the job in progress, ahead of the queued burst.
    assert len(pool._queue) >= 2, "the burst's jobs should still be waiting behind ours"
    assert await proc.wait() == 0
