"""The cloud client against a real loopback HTTP server that injects faults: 429, 500,
slow and hanging replies, malformed bodies; retries, the breaker and label mapping."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fake_cloud import Script, fake_cloud, ok

from sidecar.domain.types import ClassifyTask, ExtractTask
from sidecar.router.breaker import Breaker
from sidecar.router.cloud import CloudClient, CloudEndpoint, CloudError, match_label
from sidecar.router.outbound import build


@pytest.fixture
def cloud() -> Iterator[tuple[str, Script]]:
    with fake_cloud() as c:
        yield c


def client(url: str, breaker: Breaker | None = None, **kw: Any) -> CloudClient:
    cfg = CloudEndpoint(base_url=url, model="m", api_key_env="CLOUD_KEY", retries=kw.pop("retries", 2),
                      backoff_s=0.01, timeout_s=kw.pop("timeout_s", 2.0))  # fmt: skip
    return CloudClient(cfg, breaker or Breaker(3, 60), {"CLOUD_KEY": "sk-test"})


async def test_a_good_reply_with_usage_and_the_key_from_the_environment(cloud) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.replies = [ok("Paris", 12, 1)]
    c = client(url)
    r = await c.chat([{"role": "user", "content": "Capital of France?"}], max_tokens=5)
    assert (r.text, r.prompt_tokens, r.completion_tokens, r.attempts) == ("Paris", 12, 1, 1)
    assert script.received[0]["model"] == "m" and script.received[0]["max_tokens"] == 5
    assert script.headers[0]["authorization"] == "Bearer sk-test"
    await c.close()


@pytest.mark.parametrize(
    "fault",
    [("status", 429), ("status", 500), ("status", 503), ("raw", b"not json"), ("hang", 3)],
    ids=["429", "500", "503", "malformed", "timeout"],
)
async def test_transient_faults_are_retried_then_succeed(cloud, fault) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.replies = [fault, ok("fine")]
    c = client(url, timeout_s=0.5)
    r = await c.chat([{"role": "user", "content": "hi"}])
    assert r.text == "fine" and r.attempts == 2
    await c.close()


async def test_a_4xx_is_not_retried_and_does_not_trip_the_breaker(cloud) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.replies = [("status", 400)]
    breaker = Breaker(1, 60)
    c = client(url, breaker)
    with pytest.raises(CloudError) as e:
        await c.chat([{"role": "user", "content": "hi"}])
    assert e.value.reason == "http_400" and len(script.received) == 1
    assert breaker.state == "closed"
    await c.close()


async def test_the_breaker_opens_after_failures_and_then_refuses_without_calling(cloud) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.replies = [("status", 500)] * 4
    breaker = Breaker(2, cooldown_s=60)
    c = client(url, breaker, retries=1)
    for _ in range(2):
        with pytest.raises(CloudError) as e:
            await c.chat([{"role": "user", "content": "hi"}])
        assert e.value.reason == "http_5xx"
    assert breaker.state == "open" and len(script.received) == 4
    with pytest.raises(CloudError) as e:
        await c.chat([{"role": "user", "content": "hi"}])
    assert e.value.reason == "breaker_open" and len(script.received) == 4  # not even tried
    await c.close()


async def test_classify_maps_the_answer_and_asks_once_more(cloud) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    labels = ("lost_or_stolen_card", "card_arrival")
    script.replies = [ok("Lost or stolen card.")]
    c = client(url)
    label, _ = await c.ask_label(build(ClassifyTask("someone took my card", labels), labels))
    assert label == "lost_or_stolen_card"
    script.replies = [ok("I am not sure"), ok("card_arrival")]
    label, _ = await c.ask_label(build(ClassifyTask("where is my card", labels), labels))
    assert label == "card_arrival" and len(script.received) == 3
    script.replies = [ok("banana"), ok("still banana")]
    label, _ = await c.ask_label(build(ClassifyTask("x", labels), labels))
    assert label is None  # the caller keeps the local answer and says why
    await c.close()


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ("card_arrival", "card_arrival"),
        ("`card_arrival`", "card_arrival"),
        ("Card arrival", "card_arrival"),
        ("The label is card_arrival.", "card_arrival"),
        ("card_arrival or lost_or_stolen_card", None),  # two labels: not an answer
        ("exchange rate", None),
    ],
)
def test_match_label(answer: str, label: str | None) -> None:
    assert match_label(answer, ["card_arrival", "lost_or_stolen_card"]) == label


async def test_extract_falls_back_to_the_structured_output_form_the_server_takes(cloud) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    rejected = (
        "raw_status",
        (500, b'{"detail": "response_format.type: Input should be text or json_object"}'),
    )
    script.replies = [rejected, ok('{"a": 1}'), ok('{"a": 2}')]
    breaker = Breaker(1, 60)
    c = client(url, breaker)
    r = await c.ask_json(build(ExtractTask("a is 1", '{"type": "object"}')))
    assert r.text == '{"a": 1}' and breaker.state == "closed"  # a refusal is not a failure
    forms = [m["response_format"]["type"] for m in script.received]
    assert (
        forms == ["json_schema", "json_object"]
        and "schema" in script.received[1]["response_format"]
    )
    # Remembered: asks the working form first.
    await c.ask_json(build(ExtractTask("a is 2", '{"type": "object"}')))
    assert script.received[2]["response_format"]["type"] == "json_object"
    await c.close()
