"""Attack schemas from the hardening review, against the real daemon.

Over gRPC and over the HTTP `response_format`, on real llama.cpp workers (spawned processes,
so a crash is a dead worker and not a dead test): schemas that crashed a worker (SIGSEGV in
llama.cpp's grammar parser), hung it (`maxItems: 10**9`) or raised RecursionError are
refused with INVALID_ARGUMENT / HTTP 400 and the worker keeps its PID. And a CLOUD_ONLY
Extract whose schema pattern makes a backtracking regex engine run for minutes neither
slows the answer nor stalls the daemon's event loop (the health check answers at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx2 as httpx
import pytest
from fake_cloud import Script, fake_cloud, ok

from sidecar.schema_limits import MAX_PATTERN_REPEAT, MAX_REPEAT

ATTACKS: list[tuple[Any, list[str]]] = [
    ({"type": "string", "maxLength": 30000}, ["maxLength", "/maxLength", str(MAX_REPEAT)]),
    (
        {"type": "array", "items": {"type": "integer"}, "maxItems": 30000},
        ["maxItems", "/maxItems", str(MAX_REPEAT)],
    ),
    ({"type": "array", "items": {}, "maxItems": 10**9}, ["maxItems", str(MAX_REPEAT)]),
    (
        {"type": "string", "pattern": "^a{1,100000}$"},
        ["/pattern", "100000", str(MAX_PATTERN_REPEAT)],
    ),
    ({"type": "string", "pattern": "^(a+)\\1$"}, ["/pattern", "RE2", "backreferences"]),
]
# Inside the limits: llama.cpp compiles the grammar and the worker runs it.
INSIDE = [
    {"type": "string", "maxLength": MAX_REPEAT},
    {"type": "array", "items": {"type": "integer"}, "maxItems": MAX_REPEAT},
]


def nested_text(depth: int) -> str:
    """A schema nested `depth` objects deep, as text (json.dumps itself stops near 500)."""
    return '{"type":"object","properties":{"a":' * depth + '{"type":"string"}' + "}}" * depth


async def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    return e.value.code(), e.value.details() or ""


async def worker(served: Any) -> tuple[int, str]:
    w = (await served.client.status()).models[0].workers[0]
    return w.pid, w.state


async def test_attack_schemas_over_grpc_are_invalid_argument_and_the_worker_lives(
    serve, tiny_model: Path
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model, slot_kind="process", workers=1, context=4096)
    pid, _ = await worker(s)
    for schema, says in ATTACKS:
        started = time.perf_counter()
        code, msg = await code_of(s.client.extract("x", schema, max_tokens=16, timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (schema, code, msg)
        for part in says:
            assert part in msg, (schema, msg)
        assert time.perf_counter() - started < 2.0
    code, msg = await code_of(s.client.extract("x", nested_text(500), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "nested more than" in msg
    assert await worker(s) == (pid, "idle")
    # Just inside the limits, the grammar compiles and runs (a random tiny model may not
    # finish a 1000-item answer in 16 tokens: that is OUT_OF_RANGE, not a refusal).
    for schema in INSIDE:
        try:
            await s.client.extract("x", schema, max_tokens=16, timeout=60)
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.OUT_OF_RANGE, (schema, e.details())
            assert "not complete" in (e.details() or "")
    r = await s.client.extract("x", {"type": "string", "pattern": "^a{1,1000}$"}, max_tokens=64)
    assert json.loads(r.json).strip("a") == ""
    assert await worker(s) == (pid, "idle")


async def test_attack_schemas_over_http_response_format_are_400_and_the_worker_lives(
    serve, tiny_model: Path, short_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    sock = short_dir / "h.sock"
    s = await serve(tiny_model, slot_kind="process", workers=1, context=4096,
                    http={"socket": str(sock)})  # fmt: skip
    pid, _ = await worker(s)

    async def chat(client: httpx.AsyncClient, schema_text: str) -> httpx.Response:
        body = (
            '{"model":"default","max_tokens":16,'
            '"messages":[{"role":"user","content":"x"}],'
            '"response_format":{"type":"json_schema","json_schema":{"name":"f","schema":'
            + schema_text
            + "}}}"
        )
        return await client.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )

    transport = httpx.AsyncHTTPTransport(uds=str(sock))
    async with httpx.AsyncClient(transport=transport, base_url="http://sidecar", timeout=30) as c:
        attacks = [(json.dumps(a), says) for a, says in ATTACKS]
        # 40 objects deep: inside the HTTP body's own nesting bound, past the schema's.
        attacks.append((nested_text(40), ["nested more than"]))
        for text, says in attacks:
            r = await chat(c, text)
            assert r.status_code == 400, (text[:80], r.status_code, r.text[:300])
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error"
            for part in says:
                assert part in error["message"], (text[:80], error)
        assert await worker(s) == (pid, "idle")
        for schema in INSIDE:
            r = await chat(c, json.dumps(schema))
            assert r.status_code in (200, 400), r.text[:300]
            if r.status_code == 400:  # OUT_OF_RANGE: the tiny model did not finish
                assert "not complete" in r.json()["error"]["message"]
        r = await chat(c, json.dumps({"type": "string", "pattern": "^a{1,1000}$"}))
        assert r.status_code == 200, r.text[:300]
    assert await worker(s) == (pid, "idle")


# ---------------------------------------------------------------- cloud answers

# Python's `re` needs ~12 s to reject 15 characters against this pattern (x2.5 per character).
EVIL = "^(.|.|.)*(.|.)*X$"


@pytest.fixture
def cloud() -> Iterator[tuple[str, Script]]:
    with fake_cloud() as c:
        yield c


async def test_a_catastrophic_pattern_in_a_cloud_answer_does_not_stall_the_daemon(
    serve, tiny_model: Path, cloud: tuple[str, Script]
) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    settings = {"base_url": url, "model": "m", "backoff_seconds": 0.01, "retries": 1,
                "timeout_seconds": 5.0}  # fmt: skip
    s = await serve(tiny_model, cloud=settings)
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": EVIL}}}
    script.default = ok(json.dumps({"code": "a" * 15}))

    async def health_latency() -> float:
        await asyncio.sleep(0.05)  # let the extract reach the cloud and come back
        worst = 0.0
        for _ in range(20):
            t = time.perf_counter()
            assert await s.client.health("", timeout=30) == "SERVING"
            worst = max(worst, time.perf_counter() - t)
            await asyncio.sleep(0.02)
        return worst

    started = time.perf_counter()
    extract = asyncio.ensure_future(
        code_of(s.client.extract("the code", schema, routing="CLOUD_ONLY", timeout=60))
    )
    worst = await health_latency()
    code, msg = await extract
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "does not match" in msg, msg
    assert time.perf_counter() - started < 5.0
    assert worst < 0.5, worst
    assert len(script.received) >= 1  # the answer really came from the cloud


async def test_cloud_only_extract_bounds_the_schema_before_anything_leaves(
    serve, tiny_model: Path, cloud: tuple[str, Script]
) -> None:  # type: ignore[no-untyped-def]
    """Under CLOUD_ONLY no worker checks the schema: the router must, before the cloud is
    paid for a request that is refused anyway (or the schema parsed into a RecursionError)."""
    url, script = cloud
    script.default = ok('"x"')
    settings = {"base_url": url, "model": "m", "backoff_seconds": 0.01, "retries": 1}
    s = await serve(tiny_model, cloud=settings)
    attacks = [(nested_text(500), ["nested more than"]), *ATTACKS]
    for schema, says in attacks:
        code, msg = await code_of(s.client.extract("x", schema, routing="CLOUD_ONLY", timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (str(schema)[:80], code, msg)
        for part in says:
            assert part in msg, (str(schema)[:80], msg)
    assert script.received == []


async def test_cloud_only_classify_by_examples_is_bounded_before_anything_leaves(
    serve, tiny_model: Path, cloud: tuple[str, Script]
) -> None:  # type: ignore[no-untyped-def]
    """The few-shot path checks examples only when it runs: CLOUD_ONLY skips it."""
    url, script = cloud
    script.default = ok("a")
    settings = {"base_url": url, "model": "m", "backoff_seconds": 0.01, "retries": 1}
    s = await serve(tiny_model, cloud=settings)
    bad = [
        ([("x", "a"), ("", "b")], "examples[1].text is empty"),
        ([("x", "a"), ("y", "b" * 5000)], "at most 200"),
        ([(f"t{i}", "ab"[i % 2]) for i in range(2001)], "at most 2000"),
        ([("x", "a"), ("y", "a")], "at least 2 distinct labels"),
    ]
    for examples, says in bad:
        code, msg = await code_of(
            s.client.classify("text", examples=examples, routing="CLOUD_ONLY", timeout=30)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and says in msg, (says, code, msg)
    assert script.received == []
    r = await s.client.classify("text", examples=[("x", "a"), ("y", "b")], routing="CLOUD_ONLY")
    assert r.label == "a" and r.route.served_by == "cloud"


async def test_a_big_new_schema_is_checked_off_the_event_loop(
    serve, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    import threading

    import sidecar.router.engine as router_engine
    from sidecar.validate import checked_schema

    threads: list[str] = []

    def recording(text: str) -> Any:
        threads.append(threading.current_thread().name)
        return checked_schema(text)

    monkeypatch.setattr(router_engine, "checked_schema", recording)
    s = await serve(tiny_model)
    props = {f"field_{i}": {"type": "string", "description": "x" * 40} for i in range(40)}
    schema = {"type": "object", "properties": props}
    assert len(json.dumps(schema)) > router_engine.SCHEMA_OFF_LOOP_CHARS
    with contextlib.suppress(grpc.aio.AioRpcError):  # the fake engine's answer is not the point
        await s.client.extract("x", schema, max_tokens=8, timeout=30)
    assert threads and threading.main_thread().name not in threads
