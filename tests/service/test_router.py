"""Routing end to end through a real gRPC daemon (fake local slots) and a real loopback
cloud that injects faults and records every byte: each escalation trigger, the breaker
opening and closing, budget caps across a restart, and the sensitive-data rules."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from fake_cloud import Script, fake_cloud, ok

from sidecar.v1 import inference_pb2 as pb

LABELS = ["card_arrival", "exchange_rate"]
EMAIL = "ann.lee@example.com"
CARD = "4111 1111 1111 1111"  # passes the Luhn check
IBAN = "GB82 WEST 1234 5698 7654 32"
PHONE = "+44 20 7946 0958"


@pytest.fixture
def cloud() -> Iterator[tuple[str, Script]]:
    with fake_cloud() as c:
        yield c


def settings(url: str, **kw: Any) -> dict[str, Any]:
    base = {"base_url": url, "model": "m", "backoff_seconds": 0.01, "retries": 1,
            "timeout_seconds": 2.0, "prompt_price_per_mtok": 1.0,
            "completion_price_per_mtok": 2.0}  # fmt: skip
    return base | kw


async def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    return e.value.code(), e.value.details() or ""


async def shedding(served: Any) -> None:
    for _ in range(200):
        if served.running.local.shed_reason:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the supervisor never started shedding")


def escalations(served: Any, reason: str) -> float:
    reg = served.running.metrics.registry
    return reg.get_sample_value("sidecar_escalations_total", {"reason": reason}) or 0.0


async def test_cloud_only_classify_returns_a_given_label_with_cost(
    serve, tiny_model, cloud
) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.replies = [ok("Exchange rate.", prompt=100, completion=3)]
    s = await serve(tiny_model, cloud=settings(url))
    r = await s.client.classify("how much is 1 euro in dollars", LABELS, routing="CLOUD_ONLY")
    assert r.label == "exchange_rate"
    assert r.route.served_by == "cloud" and r.route.reason_code == "cloud_only"
    assert r.route.cost == pytest.approx((100 * 1.0 + 3 * 2.0) / 1e6)
    assert r.route.cloud_latency_ms > 0 and not r.route.HasField("local_confidence")
    assert script.received[0]["model"] == "m"
    assert escalations(s, "cloud_only") == 1


async def test_auto_escalates_an_unsure_answer_and_keeps_a_sure_one(
    serve, tiny_model, cloud
) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.default = ok("card_arrival")
    s = await serve(tiny_model, cloud=settings(url, classify_threshold=0.999))
    r = await s.client.classify("where is my new card", LABELS)
    assert r.route.served_by == "cloud" and r.route.reason_code == "low_confidence"
    assert "low local confidence: top probability" in r.route.reason
    assert 0 < r.route.local_confidence < 0.999
    router = s.running.router
    router.settings = replace(router.settings, classify_threshold=0.0)
    r = await s.client.classify("where is my new card", LABELS)
    assert r.route.served_by == "local" and r.route.reason == "" and len(script.received) == 1
    # Generate and Extract are judged by their token log-probabilities.
    router.settings = replace(router.settings, generate_mean_logprob=-0.1)  # fake gives -0.5
    g = await s.client.generate("hello there", max_tokens=3)
    assert g.route.served_by == "cloud" and "mean logprob -0.500 < -0.100" in g.route.reason
    assert escalations(s, "low_confidence") == 2


async def test_local_overload_and_context_overflow_escalate(serve, tiny_model, cloud) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.default = ok("from the cloud")
    # A memory floor no machine meets: the supervisor sheds every local request.
    s = await serve(tiny_model, cloud=settings(url), server={"min_available_mb": 10**9})
    await shedding(s)
    g = await s.client.generate("hello", max_tokens=4)
    assert (g.text, g.route.served_by, g.route.reason_code) == (
        "from the cloud",
        "cloud",
        "local_overloaded",
    )
    # LOCAL_ONLY never escalates: the local error stands.
    code, _ = await code_of(s.client.generate("hello", max_tokens=4, routing="LOCAL_ONLY"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    s = await serve(tiny_model, cloud=settings(url), socket=s.socket.with_name("b.sock"))
    g = await s.client.generate("hello", max_tokens=100_000)  # beyond the local context
    assert g.route.served_by == "cloud" and g.route.reason_code == "local_context"
    assert script.received[-1]["max_tokens"] == 100_000


async def test_pre_routing_rules_skip_the_local_model(serve, tiny_model, cloud) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.default = ok("card_arrival")
    s = await serve(tiny_model, cloud=settings(
        url, pre_route_keywords=("lawsuit",), pre_route_max_chars=200, pre_route_tasks=("extract",)
    ))  # fmt: skip
    r = await s.client.classify("I will file a LAWSUIT about my card", LABELS)
    assert r.route.served_by == "cloud" and "keyword 'lawsuit'" in r.route.reason
    r = await s.client.classify("x" * 300, LABELS)
    assert "pre_route_max_chars" in r.route.reason
    script.default = ok('{"name": "Ann"}')
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    e = await s.client.extract("Ann wrote", schema)
    assert e.route.served_by == "cloud" and json.loads(e.json) == {"name": "Ann"}
    assert escalations(s, "pre_route") == 3


async def test_the_breaker_opens_answers_locally_then_closes_after_a_probe(
    serve, tiny_model, cloud
) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.default = ("status", 500)
    s = await serve(tiny_model, cloud=settings(
        url, classify_threshold=0.999, breaker_failures=2, breaker_cooldown_seconds=1.0
    ))  # fmt: skip
    for _ in range(2):  # unsure: escalation tried, the cloud fails, the local answer stands
        r = await s.client.classify("where is my card", LABELS)
        assert r.route.served_by == "local" and r.route.reason_code == "cloud_failed"
        assert "the cloud failed" in r.route.reason
    sent = len(script.received)
    assert (await s.client.status()).cloud.breaker == "open"
    r = await s.client.classify("where is my card", LABELS)
    assert r.route.served_by == "local" and "breaker is open" in r.route.reason
    t0 = time.monotonic()
    code, msg = await code_of(s.client.classify("where is my card", LABELS, routing="CLOUD_ONLY"))
    assert code == grpc.StatusCode.UNAVAILABLE and "breaker is open" in msg
    assert time.monotonic() - t0 < 0.5 and len(script.received) == sent  # fails fast, unsent
    reg = s.running.metrics.registry
    assert reg.get_sample_value("sidecar_cloud_breaker_state") == 2.0
    await asyncio.sleep(1.1)  # cooldown over: one probe goes through and closes it
    script.default = ok("card_arrival")
    r = await s.client.classify("where is my card", LABELS)
    assert r.route.served_by == "cloud"
    assert (await s.client.status()).cloud.breaker == "closed"


async def test_a_spent_budget_stays_spent_across_a_restart(
    serve, tiny_model, cloud, short_dir
) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.default = ok("card_arrival", prompt=1000, completion=0)  # 0.001 per call
    cfg = settings(url, daily_cap=0.0015, classify_threshold=0.999)
    s = await serve(tiny_model, cloud=cfg)
    for _ in range(2):  # the second call goes over the cap: it was allowed, and is counted
        r = await s.client.classify("where is my card", LABELS, routing="CLOUD_ONLY")
        assert r.route.served_by == "cloud"
    code, msg = await code_of(s.client.classify("where is my card", LABELS, routing="CLOUD_ONLY"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "daily cloud budget" in msg
    r = await s.client.classify("where is my card", LABELS)  # AUTO stays local, says why
    assert r.route.served_by == "local" and "daily cloud budget is spent" in r.route.reason
    st = (await s.client.status()).cloud
    assert st.spent_day == pytest.approx(0.002) and st.daily_cap == 0.0015
    await s.running.stop(grace=0)
    assert (short_dir / "store/router/budget.json").is_file()
    s2 = await serve(tiny_model, cloud=cfg)
    code, msg = await code_of(s2.client.classify("x y", LABELS, routing="CLOUD_ONLY"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "daily" in msg
    assert len(script.received) == 2


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        (f"my email is {EMAIL}, where is my card", "email"),
        (f"card {CARD} was charged twice", "card"),
        (f"send it to {IBAN} please", "iban"),
        (f"call me on {PHONE} about my card", "phone"),
        ("account ACCT-123456 is locked", "custom0"),
    ],
)
async def test_sensitive_requests_never_leave_the_machine(
    serve, tiny_model, cloud, text, kind
) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    s = await serve(tiny_model, cloud=settings(
        url, classify_threshold=0.999, sensitive_patterns=(r"ACCT-\d{6}",)
    ))  # fmt: skip
    r = await s.client.classify(text, LABELS)
    assert r.route.served_by == "local"
    assert f"sensitive data ({kind})" in r.route.reason and "never leaves" in r.route.reason
    code, msg = await code_of(s.client.classify(text, LABELS, routing="CLOUD_ONLY"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and kind in msg
    code, _ = await code_of(s.client.chat([("user", text)], routing="CLOUD_ONLY"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert not script.raw  # not one byte reached the cloud


async def test_a_request_marked_sensitive_never_leaves(serve, tiny_model, cloud) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    s = await serve(tiny_model, cloud=settings(url, classify_threshold=0.999, redact=True))
    r = await s.client.classify("nothing personal here", LABELS, sensitive=True)
    assert r.route.served_by == "local" and "sensitive data (marked)" in r.route.reason
    # A local failure cannot leak it either.
    s = await serve(tiny_model, cloud=settings(url), server={"min_available_mb": 10**9},
                    socket=s.socket.with_name("b.sock"))  # fmt: skip
    await shedding(s)
    code, msg = await code_of(s.client.generate("nothing personal", sensitive=True))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "never leaves" in msg
    assert not script.raw


async def test_redaction_escalates_with_the_matches_replaced(serve, tiny_model, cloud) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.default = ok("card_arrival")
    s = await serve(tiny_model, cloud=settings(url, classify_threshold=0.999, redact=True))
    r = await s.client.classify(f"I am {EMAIL}, card {CARD}, where is it", LABELS)
    assert r.route.served_by == "cloud"
    assert script.seen("[EMAIL]") and script.seen("[CARD]")
    assert not script.seen(EMAIL) and not script.seen("4111")


async def test_an_invalid_cloud_label_is_asked_again_then_the_local_answer_stands(
    serve, tiny_model, cloud
) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.replies = [ok("banana"), ok("still banana")]
    s = await serve(tiny_model, cloud=settings(url, classify_threshold=0.999))
    r = await s.client.classify("where is my card", LABELS)
    assert r.label in LABELS and r.route.served_by == "local"
    assert r.route.reason_code == "cloud_invalid" and "named none of the labels" in r.route.reason
    assert len(script.received) == 2
    script.replies = [ok("banana"), ok("banana")]
    code, msg = await code_of(s.client.classify("where is my card", LABELS, routing="CLOUD_ONLY"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "none of the labels" in msg


async def test_extract_through_the_cloud_is_schema_valid_or_a_clear_error(
    serve, tiny_model, cloud
) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    schema = {"type": "object", "properties": {"total": {"type": "number"}}, "required": ["total"]}
    s = await serve(tiny_model, cloud=settings(url))
    script.replies = [ok('{"total": 12.5}')]
    e = await s.client.extract("Total due: 12.50", schema, routing="CLOUD_ONLY")
    assert json.loads(e.json) == {"total": 12.5} and e.route.served_by == "cloud"
    assert script.received[0]["response_format"]["type"] == "json_schema"
    script.replies = [ok('{"sum": "twelve"}')]
    code, msg = await code_of(s.client.extract("Total due: 12.50", schema, routing="CLOUD_ONLY"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "does not satisfy the schema" in msg


async def test_an_unsure_extract_escalates_on_its_token_logprobs(serve, tiny_model, cloud) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    schema = {"type": "object", "properties": {"total": {"type": "number"}}, "required": ["total"]}
    script.default = ok('{"total": 7}')
    s = await serve(tiny_model, cloud=settings(url, extract_mean_logprob=-0.05))  # fake: -0.1
    e = await s.client.extract("Total: 7", schema)
    assert e.route.served_by == "cloud" and "mean logprob -0.100 < -0.050" in e.route.reason
    assert json.loads(e.json) == {"total": 7}
    s.running.router.settings = replace(s.running.router.settings, extract_mean_logprob=-1.0)
    e = await s.client.extract("Total: 7", schema)
    assert e.route.served_by == "local" and e.route.local_confidence == pytest.approx(-0.1)


async def test_streams_are_routed_before_they_start(serve, tiny_model, cloud) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.default = ok("streamed from the cloud")
    s = await serve(tiny_model, cloud=settings(url))
    chunks = [c async for c in s.client.chat_stream([("user", "hi")], routing="CLOUD_ONLY")]
    assert chunks[0].text == "streamed from the cloud"
    assert chunks[-1].summary.route.served_by == "cloud"
    chunks = [c async for c in s.client.generate_stream("one two", max_tokens=2)]
    assert chunks[-1].summary.route.served_by == "local"


async def test_bad_routing_input_gets_a_clear_error(serve, tiny_model) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model)  # no cloud configured
    code, msg = await code_of(s.client.classify("x", LABELS, routing="CLOUD_ONLY"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "no cloud configured" in msg
    req = pb.GenerateRequest(prompt="hi", routing=42)  # type: ignore[arg-type]
    code, msg = await code_of(s.client.inference.Generate(req))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "routing 42" in msg
    code, msg = await code_of(s.client.classify("x", task="nope"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no task named 'nope'" in msg
    code, msg = await code_of(s.client.classify("x", examples=[("a", "one"), ("b", "one")]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "at least 2 distinct labels" in msg
    code, msg = await code_of(s.client.classify("x", examples=[("a", "one"), ("", "two")]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "examples[1].text is empty" in msg
    # ...and the daemon keeps serving.
    r = await s.client.classify("where is my card", LABELS)
    assert r.route.served_by == "local"


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    import csv

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "intent"])
        w.writerows(rows)
    return path


ROWS = [
    ("where is my new card", "card_arrival"),
    ("my card has not arrived yet", "card_arrival"),
    ("card still not delivered", "card_arrival"),
    ("when will my card arrive", "card_arrival"),
    ("what is the exchange rate for euros", "exchange_rate"),
    ("how much is the dollar exchange rate", "exchange_rate"),
    ("rate to exchange pounds", "exchange_rate"),
    ("exchange rate today", "exchange_rate"),
    ("I forgot my pin", "pin"),
    ("my pin is blocked", "pin"),
    ("reset my pin number", "pin"),
    ("how do I change my pin", "pin"),
]


async def test_classify_by_examples_and_by_a_config_task_with_a_disk_cache(
    serve, tiny_model, short_dir
) -> None:  # type: ignore[no-untyped-def]
    from sidecar.config import TaskConfig

    s = await serve(tiny_model)
    r = await s.client.classify("my card has still not arrived", examples=ROWS)
    assert r.label == "card_arrival" and len(r.scores) == 3
    assert sum(x.probability for x in r.scores) == pytest.approx(1.0)
    r = await s.client.classify("pin blocked again", ["pin", "exchange_rate"], examples=ROWS)
    assert r.label == "pin" and {x.label for x in r.scores} == {"pin", "exchange_rate"}
    code, msg = await code_of(s.client.classify("x", ["refund"], examples=ROWS))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'refund' has no examples" in msg
    cache = short_dir / "store/router/examples"
    assert len(list(cache.glob("*.npy"))) == 1 and len(list(cache.glob("*.npz"))) == 1

    csv_file = _write_csv(short_dir / "intents.csv", ROWS)
    task = TaskConfig("intents", csv_file, "text", "intent", "", "", -1.0, False)
    s2 = await serve(tiny_model, tasks=(task,), socket=short_dir / "t.sock")
    for _ in range(100):
        if (await s2.client.status()).cloud.tasks.get("intents") == "ready":
            break
        await asyncio.sleep(0.05)
    r = await s2.client.classify("what's the rate to exchange dollars", task="intents")
    assert r.label == "exchange_rate" and r.route.served_by == "local"
    # Same examples, same model version: the vectors came from the cache, not re-embedded.
    assert len(list(cache.glob("*.npy"))) == 1
    embeds = sum(sl.info.requests for p in s2.running.local.pools.values() for sl in p._slots)
    assert embeds <= 1  # at most the request's own text


async def test_without_the_cascade_every_request_runs_the_model(
    serve, tiny_model, short_dir
) -> None:  # type: ignore[no-untyped-def]
    from sidecar.config import TaskConfig

    csv_file = _write_csv(short_dir / "intents.csv", ROWS)
    task = TaskConfig("intents", csv_file, "text", "intent", "", "", -1.0, False, cascade=False)
    s = await serve(tiny_model, tasks=(task,))
    for _ in range(100):
        if (await s.client.status()).cloud.tasks.get("intents") == "ready":
            break
        await asyncio.sleep(0.05)
    for text, _label in ROWS[:4]:
        r = await s.client.classify(text, task="intents")
        assert r.usage.prompt_tokens > 0  # the model embedded it


async def test_a_damaged_vector_cache_is_recomputed(serve, tiny_model, short_dir) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model)
    await s.client.classify("my card has still not arrived", examples=ROWS)
    (npy,) = (short_dir / "store/router/examples").glob("*.npy")
    npy.write_bytes(b"garbage")
    s.running.fewshot.builds._built.clear()
    r = await s.client.classify("my card has still not arrived", examples=ROWS)
    assert r.label == "card_arrival"
    import numpy as np

    assert np.load(npy).shape[0] == len(ROWS)


async def test_the_http_api_routes_too_and_says_who_answered(
    serve, tiny_model, cloud, short_dir
) -> None:  # type: ignore[no-untyped-def]
    import openai
    from openai_client import unix_client  # type: ignore[import-not-found]

    url, script = cloud
    script.default = ok("from the cloud")
    await serve(tiny_model, cloud=settings(url), http={"socket": str(short_dir / "h.sock")})
    client = unix_client(short_dir / "h.sock")
    try:
        msgs = [{"role": "user", "content": "hi there"}]
        r = await client.chat.completions.create(
            model="default", messages=msgs, max_tokens=3,
            extra_body={"sidecar_routing": "CLOUD_ONLY"},
        )  # fmt: skip
        ext = r.model_extra["sidecar"]  # type: ignore[index]
        assert r.choices[0].message.content == "from the cloud"
        assert ext["served_by"] == "cloud" and ext["route"]["reason_code"] == "cloud_only"
        r = await client.chat.completions.create(model="default", messages=msgs, max_tokens=3)
        assert r.model_extra["sidecar"]["served_by"] == "local"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError, match="sidecar_routing"):
            await client.chat.completions.create(
                model="default", messages=msgs, extra_body={"sidecar_routing": "MAYBE"}
            )
        with pytest.raises(openai.BadRequestError, match="never leaves"):
            await client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": f"I am {EMAIL}"}],
                extra_body={"sidecar_routing": "CLOUD_ONLY"},
            )  # fmt: skip
    finally:
        await client.close()
    assert not script.seen(EMAIL)


async def test_a_slow_local_model_is_cancelled_and_escalated(serve, tiny_model, cloud) -> None:  # type: ignore[no-untyped-def]
    from sidecar.engine.fake import FakeSlot

    url, script = cloud
    script.default = ok("fast cloud answer")
    s = await serve(tiny_model, cloud=settings(url, local_timeout_seconds=0.3))
    FakeSlot.token_delay_s = 0.05
    try:
        t0 = time.monotonic()
        g = await s.client.generate("one two three", max_tokens=200)  # ~10 s locally
        assert g.route.served_by == "cloud" and g.route.reason_code == "local_timeout"
        assert "local_timeout_seconds" in g.route.reason and time.monotonic() - t0 < 3
        # The cancelled local job freed its worker: LOCAL_ONLY (no time limit) still works.
        FakeSlot.token_delay_s = 0.0
        g = await s.client.generate("one two", max_tokens=2, routing="LOCAL_ONLY")
        assert g.route.served_by == "local"
    finally:
        FakeSlot.token_delay_s = 0.0


async def test_a_worker_that_dies_mid_request_is_escalated(serve, tiny_model, cloud) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal

    url, script = cloud
    script.default = ok("the cloud took over")
    s = await serve(tiny_model, slot_kind="process", cloud=settings(url), model_keys={"workers": 1})
    call = asyncio.ensure_future(s.client.generate("once upon a time", max_tokens=1900))
    (pool,) = s.running.local.pools.values()
    for _ in range(200):  # wait until the worker is busy with it
        if any(sl.info.state == "busy" for sl in pool._slots):
            break
        await asyncio.sleep(0.01)
    os.kill(pool._slots[0].info.pid, signal.SIGKILL)
    g = await call
    assert g.text == "the cloud took over"
    assert g.route.served_by == "cloud" and g.route.reason_code == "local_unavailable"


async def test_a_task_still_being_prepared_escalates_with_its_labels(
    serve, tiny_model, cloud, short_dir
) -> None:  # type: ignore[no-untyped-def]
    from sidecar.config import TaskConfig
    from sidecar.engine.fake import FakeSlot

    url, script = cloud
    script.default = ok("pin")
    csv_file = _write_csv(short_dir / "intents.csv", ROWS)
    task = TaskConfig("intents", csv_file, "text", "intent", "", "", -1.0, False)
    FakeSlot.token_delay_s = 1.0  # embedding the examples takes a while
    try:
        s = await serve(tiny_model, tasks=(task,), cloud=settings(url))
        code, msg = await code_of(
            s.client.classify("pin blocked", task="intents", routing="LOCAL_ONLY")
        )
        assert code == grpc.StatusCode.UNAVAILABLE and "being prepared" in msg
        r = await s.client.classify("pin blocked", task="intents")
        assert r.label == "pin" and r.route.served_by == "cloud"
        assert r.route.reason_code == "local_unavailable"
        sent = script.received[-1]["messages"][0]["content"]
        assert all(label in sent for label in ("card_arrival", "exchange_rate", "pin"))
    finally:
        FakeSlot.token_delay_s = 0.0


async def test_a_local_error_not_escalated_for_privacy_says_why_in_its_cause(
    serve, tiny_model, cloud
) -> None:  # type: ignore[no-untyped-def]
    from sidecar.client import SidecarError
    from sidecar.engine.fake import FakeSlot

    url, script = cloud
    script.default = ok("never asked")
    s = await serve(tiny_model, cloud=settings(url, local_timeout_seconds=0.2))
    FakeSlot.token_delay_s = 0.05
    try:
        with pytest.raises(SidecarError) as e:
            await s.client.generate("one two three", max_tokens=200, sensitive=True)
    finally:
        FakeSlot.token_delay_s = 0.0
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "escalation blocked" in (e.value.details() or "")
    # what `sidecar eval` reads to count the row as kept local by the privacy rules
    assert dict(list(e.value.trailing_metadata()))["sidecar-cause"] == "sensitive"
    assert not script.received
