"""Out of scope through a real gRPC daemon and a real loopback cloud: allow_none, novelty
and out_of_scope over the wire, AUTO escalating an out-of-scope answer with the same label
contract (the cloud may say "none of these" only when the caller allows it), a blocked
cloud leaving the local answer with its reason, and a real llama.cpp worker's novelty."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from click.testing import CliRunner
from fake_cloud import Script, fake_cloud, ok

from sidecar.cli import main
from sidecar.worker import label_scope

LABELS = ["card_arrival", "exchange_rate"]
TEXT = "what is the weather like on mars"
# The fake slot's novelty for two labels is about 0.5: these cuts put it on either side.
ALWAYS, NEVER = 0.01, 1.0


@pytest.fixture
def cloud() -> Iterator[tuple[str, Script]]:
    with fake_cloud() as c:
        yield c


def settings(url: str, **kw: Any) -> dict[str, Any]:
    return {"base_url": url, "model": "m", "backoff_seconds": 0.01, "retries": 0,
            "timeout_seconds": 2.0} | kw  # fmt: skip


def escalations(served: Any, reason: str) -> float:
    reg = served.running.metrics.registry
    return reg.get_sample_value("sidecar_escalations_total", {"reason": reason}) or 0.0


def prompt_of(script: Script, i: int = -1) -> str:
    return str(script.received[i]["messages"][-1]["content"])


async def test_novelty_and_out_of_scope_cross_the_socket_and_allow_none_empties_the_label(
    serve, tiny_model, cloud
) -> None:  # type: ignore[no-untyped-def]
    url, _ = cloud
    s = await serve(tiny_model, cloud=settings(url, classify_none_novelty=NEVER))
    r = await s.client.classify(TEXT, LABELS, routing="LOCAL_ONLY", allow_none=True)
    assert r.HasField("novelty") and 0.0 <= r.novelty <= 1.0
    assert not r.out_of_scope and r.label in LABELS
    router = s.running.router
    router.settings = replace(router.settings, classify_none_novelty=ALWAYS)
    r = await s.client.classify(TEXT, LABELS, routing="LOCAL_ONLY", allow_none=True)
    assert r.out_of_scope and r.label == ""
    assert r.scores[0].label in LABELS  # the scores stay, best first
    assert r.route.served_by == "local" and r.route.reason == ""
    # Without allow_none the caller still gets the best label, flagged.
    r = await s.client.classify(TEXT, LABELS, routing="LOCAL_ONLY")
    assert r.out_of_scope and r.label in LABELS
    # Off (0): never out of scope, the novelty is still reported.
    router.settings = replace(router.settings, classify_none_novelty=0.0)
    r = await s.client.classify(TEXT, LABELS, routing="LOCAL_ONLY", allow_none=True)
    assert not r.out_of_scope and r.label in LABELS and r.HasField("novelty")


async def test_auto_escalates_out_of_scope_and_the_cloud_may_answer_none_when_allowed(
    serve, tiny_model, cloud
) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.default = ok("None of these.")
    s = await serve(
        tiny_model, cloud=settings(url, classify_none_novelty=ALWAYS, classify_threshold=0.0)
    )
    r = await s.client.classify(TEXT, LABELS, allow_none=True)
    assert r.route.served_by == "cloud" and r.route.reason_code == "out_of_scope"
    assert r.route.reason.startswith("out of scope: novelty 0.")
    assert r.label == "" and r.out_of_scope and not r.HasField("novelty")
    assert sorted(x.label for x in r.scores) == sorted(LABELS)
    assert "none of these" in prompt_of(script)
    assert escalations(s, "out_of_scope") == 1
    # A label answer is a label answer.
    script.default = ok("Exchange rate")
    r = await s.client.classify(TEXT, LABELS, allow_none=True)
    assert r.route.served_by == "cloud" and r.label == "exchange_rate" and not r.out_of_scope
    assert escalations(s, "out_of_scope") == 2


async def test_without_allow_none_the_cloud_must_name_a_label(serve, tiny_model, cloud) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.default = ok("none of these")
    s = await serve(
        tiny_model, cloud=settings(url, classify_none_novelty=ALWAYS, classify_threshold=0.0)
    )
    r = await s.client.classify(TEXT, LABELS)
    assert "none of these" not in prompt_of(script, 0)  # not offered
    assert len(script.received) == 2  # "none" is no label: asked once more
    # Still no label: the local answer stands, flagged, with why.
    assert r.route.served_by == "local" and r.route.reason_code == "cloud_invalid"
    assert r.label in LABELS and r.out_of_scope
    script.default = ok("card_arrival")
    r = await s.client.classify(TEXT, LABELS)
    assert r.route.served_by == "cloud" and r.label == "card_arrival"


async def test_a_blocked_cloud_keeps_the_out_of_scope_local_answer_with_the_reason(
    serve, tiny_model, cloud
) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    s = await serve(
        tiny_model, cloud=settings(url, classify_none_novelty=ALWAYS, classify_threshold=0.0)
    )
    r = await s.client.classify(TEXT, LABELS, allow_none=True, sensitive=True)
    assert r.route.served_by == "local" and r.route.reason_code == "blocked"
    assert r.route.reason.startswith("out of scope: novelty ")
    assert "escalation blocked: sensitive data (marked)" in r.route.reason
    assert r.label == "" and r.out_of_scope and r.HasField("novelty")
    assert script.received == []


async def test_a_real_worker_sets_the_zero_shot_novelty_from_its_label_scores(
    serve, tiny_model
) -> None:  # type: ignore[no-untyped-def]
    from llama_cpp import Llama

    labels = [*LABELS, "top_up"]
    s = await serve(tiny_model, slot_kind="process")
    r = await s.client.classify("where is my new card", labels)
    # The default cut applies: random weights put little mass on any label.
    cut = s.config.cloud.classify_none_novelty
    assert r.HasField("novelty") and r.out_of_scope == (r.novelty >= cut) and cut > 0
    # The reply's own log-probabilities and the labels' token lengths (+ end of turn)
    # give the same novelty.
    vocab = Llama(str(tiny_model), vocab_only=True, verbose=False)
    lengths = {x: len(vocab.tokenize(x.encode(), add_bos=False)) + 1 for x in labels}
    vocab.close()
    expected = label_scope.novelty(
        [x.logprob for x in r.scores], [lengths[x.label] for x in r.scores]
    )
    assert r.novelty == pytest.approx(expected)
    assert 0.0 <= r.novelty <= 1.0


async def test_cli_allow_none_prints_no_label_and_the_scope(serve, tiny_model, cloud) -> None:  # type: ignore[no-untyped-def]
    url, _ = cloud
    s = await serve(tiny_model, cloud=settings(url, classify_none_novelty=ALWAYS))
    base = ["classify", TEXT, "-l", LABELS[0], "-l", LABELS[1], "--socket", str(s.socket),
            "--routing", "LOCAL_ONLY"]  # fmt: skip

    async def cli(*extra: str) -> Any:
        out = await asyncio.to_thread(CliRunner().invoke, main, [*base, *extra])
        assert out.exit_code == 0, out.output
        return out

    out = await cli("--allow-none")
    assert out.stdout == "\n"  # no label
    assert "out of scope (novelty 0." in out.stderr
    out = await cli()
    assert out.stdout.strip() in LABELS and "out of scope (novelty" in out.stderr
    doc = json.loads((await cli("--allow-none", "--json")).stdout)
    assert doc["label"] == "" and doc["out_of_scope"] is True and 0 < doc["novelty"] <= 1
