"""Shadow traffic through a real gRPC daemon (fake local slots) and a real loopback cloud:
calls leave after the reply and never delay it, never carry sensitive requests, stop at
their own cap, and what they find (agreement, disagreements) reaches status, metrics and
`sidecar eval export-disagreements`."""

from __future__ import annotations

import asyncio
import csv
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from fake_cloud import Script, fake_cloud, ok

from sidecar.cli.commands import main
from sidecar.cli.support import EXIT_CONFIG, EXIT_FAILED
from sidecar.config import TaskConfig

LABELS = ["card_arrival", "exchange_rate"]
TEXT = "where is my new card"
LOCAL, OTHER = "exchange_rate", "card_arrival"  # the fake slot answers LOCAL for TEXT
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@pytest.fixture
def cloud() -> Iterator[tuple[str, Script]]:
    with fake_cloud() as c:
        yield c


def settings(url: str, **kw: Any) -> dict[str, Any]:
    # classify_threshold 0: every local answer is kept, so each one is a shadow candidate.
    base = {"base_url": url, "model": "m", "retries": 0, "timeout_seconds": 3.0,
            "prompt_price_per_mtok": 1.0, "completion_price_per_mtok": 2.0,
            "classify_threshold": 0.0, "extract_mean_logprob": -100.0,
            "shadow_rate": 1.0}  # fmt: skip
    return base | kw


async def settled(s: Any, n: int, limit: float = 10.0) -> Any:
    """The shadow status once n calls have ended (answered, failed or capped)."""
    end = time.monotonic() + limit
    while True:
        sh = (await s.client.status()).cloud.shadow
        if sum(sh.counts.get(k, 0) for k in ("sent", "failed", "capped")) >= n:
            return sh
        assert time.monotonic() < end, f"shadow calls never ended: {dict(sh.counts)}"
        await asyncio.sleep(0.02)


async def cli(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, main, list(args))


async def test_the_reply_never_waits_for_the_shadow_call_and_agreement_is_counted(
    serve, tiny_model, cloud
) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.default = ok(LOCAL)
    script.delay = 1.0  # every cloud answer takes a second
    s = await serve(tiny_model, cloud=settings(url))
    t0 = time.monotonic()
    r = await s.client.classify(TEXT, LABELS, routing="AUTO")
    latency = time.monotonic() - t0
    assert r.route.served_by == "local" and r.label == LOCAL
    assert latency < 0.5, latency  # the second the cloud takes is not in the reply
    assert (await s.client.status()).cloud.shadow.counts.get("sent", 0) == 0  # not yet answered
    sh = await settled(s, 1)
    assert time.monotonic() - t0 >= 1.0  # compared only once the cloud answered
    assert len(script.received) == 1 and TEXT in script.received[0]["messages"][0]["content"]
    (a,) = sh.agreement
    assert a.key.startswith("classify:") and "@" in a.model
    assert (a.agreed, a.total) == (1, 1) and 0.2 < a.low < 1 and a.high == 1.0
    # The shadow call is paid from its own budget, shown beside the main spend.
    st = (await s.client.status()).cloud
    assert st.spent_day == 0 and st.calls == 0
    assert st.shadow.spent_day == pytest.approx((10 * 1.0 + 2 * 2.0) / 1e6)
    reg = s.running.metrics.registry
    labels = {"key": a.key, "model": a.model}
    assert reg.get_sample_value("sidecar_shadow_requests_total", {"result": "sent"}) == 1
    assert reg.get_sample_value("sidecar_shadow_pairs_total", labels) == 1
    assert reg.get_sample_value("sidecar_shadow_agreement", {**labels, "bound": "rate"}) == 1
    assert reg.get_sample_value("sidecar_shadow_agreement", {**labels, "bound": "low"}) == a.low
    out = await cli("status", "--socket", str(s.socket))
    assert out.exit_code == 0, out.output
    assert f"agreement {a.key} ({a.model}): 1.000 [{a.low:.3f}, 1.000] of 1" in out.output
    assert "shadow: rate 1, spent" in out.output and "1 sent" in out.output


async def test_at_most_two_shadow_calls_run_at_once_the_rest_are_dropped(
    serve, tiny_model, cloud
) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.default = ok(LOCAL)
    script.delay = 1.0
    s = await serve(tiny_model, cloud=settings(url))
    t0 = time.monotonic()
    for _ in range(5):
        r = await s.client.classify(TEXT, LABELS, routing="AUTO")
        assert r.route.served_by == "local"
    assert time.monotonic() - t0 < 1.0  # five replies inside the first shadow call's second
    sh = await settled(s, 2)
    assert dict(sh.counts) == {"sent": 2, "dropped": 3, "capped": 0, "failed": 0}
    assert len(script.received) == 2


async def test_sensitive_local_only_and_escalated_requests_are_never_shadowed(
    serve, tiny_model, cloud
) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.default = ok(LOCAL)
    s = await serve(tiny_model, cloud=settings(url, redact=True))
    secret = "where is my card, mail ann.lee@example.com"
    await s.client.classify(secret, LABELS, routing="AUTO")  # a finding: even redacted, never
    await s.client.classify("my card 42", LABELS, sensitive=True)  # marked
    await s.client.classify(TEXT, LABELS, routing="LOCAL_ONLY")
    await s.client.extract("n is 3", SCHEMA, sensitive=True)
    router = s.running.router
    router.settings = replace(router.settings, classify_threshold=1.0)
    r = await s.client.classify(TEXT, LABELS, routing="AUTO")  # went to the cloud itself
    assert r.route.served_by == "cloud"
    await asyncio.sleep(0.3)  # time enough for a shadow call, were one started
    assert len(script.received) == 1  # the escalation only
    assert not script.seen("ann.lee") and not script.seen("EMAIL")
    assert not script.seen("n is 3") and not script.seen("my card 42")
    sh = (await s.client.status()).cloud.shadow
    assert not sh.agreement and sum(sh.counts.values()) == 0


async def test_the_shadow_cap_stops_shadowing_and_is_counted(serve, tiny_model, cloud) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.default = ok(LOCAL)
    # One call (14 micro-units) spends the whole cap; the main caps are untouched.
    s = await serve(tiny_model, cloud=settings(url, shadow_daily_cap=1e-5, daily_cap=1.0))
    await s.client.classify(TEXT, LABELS, routing="AUTO")
    await settled(s, 1)
    for _ in range(3):
        await s.client.classify(TEXT, LABELS, routing="AUTO")
    sh = await settled(s, 4)
    assert dict(sh.counts) == {"sent": 1, "dropped": 0, "capped": 3, "failed": 0}
    assert len(script.received) == 1 and sh.spent_day > sh.daily_cap == 1e-5
    reg = s.running.metrics.registry
    assert reg.get_sample_value("sidecar_shadow_requests_total", {"result": "capped"}) == 3
    # A cloud escalation is still paid from the main budget, which the shadow spend is not in.
    router = s.running.router
    router.settings = replace(router.settings, classify_threshold=1.0)
    r = await s.client.classify(TEXT, LABELS, routing="AUTO")
    assert r.route.served_by == "cloud"


@pytest.mark.parametrize("fault", [("status", 500), ("hang", 3)], ids=["500", "hang"])
async def test_a_failing_or_hanging_cloud_never_touches_the_reply(
    serve, tiny_model, cloud, fault
) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.default = fault
    s = await serve(tiny_model, cloud=settings(url, timeout_seconds=0.5))
    t0 = time.monotonic()
    r = await s.client.classify(TEXT, LABELS, routing="AUTO")
    e = await s.client.extract("n is 3", SCHEMA, routing="AUTO")
    assert time.monotonic() - t0 < 0.4
    assert r.route.served_by == "local" and r.route.reason == ""
    assert e.route.served_by == "local" and e.json == '{"n": 1}'
    sh = await settled(s, 2)
    assert sh.counts["failed"] == 2 and sh.counts["sent"] == 0 and not sh.agreement


async def test_disagreements_are_kept_and_exported_as_csv(
    serve, tiny_model, cloud, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.replies = [ok(OTHER), ok(LOCAL), ok('{"n": 3}')]
    s = await serve(tiny_model, cloud=settings(url))
    await s.client.classify(TEXT, LABELS, routing="AUTO")
    await settled(s, 1)
    await s.client.classify(TEXT, LABELS, routing="AUTO")
    await settled(s, 2)
    await s.client.extract("n is 3", SCHEMA, routing="AUTO")  # the fake slot says n = 1
    sh = await settled(s, 3)
    by_key = {a.key.split(":")[0]: a for a in sh.agreement}
    assert (by_key["classify"].agreed, by_key["classify"].total) == (1, 2)
    assert (by_key["extract"].agreed, by_key["extract"].total) == (0, 1)

    out_csv = tmp_path / "d.csv"
    key = by_key["classify"].key
    got = await cli("eval", "export-disagreements", key, "-o", str(out_csv),
                    "--socket", str(s.socket))  # fmt: skip
    assert got.exit_code == 0, got.output
    assert f"1 disagreements of {key} written to {out_csv}" in got.stderr
    with out_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["text"], r["cloud"], r["local"]) for r in rows] == [(TEXT, OTHER, LOCAL)]
    assert rows[0]["model"] == by_key["classify"].model and float(rows[0]["confidence"]) > 0

    got = await cli("eval", "export-disagreements", by_key["extract"].key, "-o", str(out_csv),
                    "--socket", str(s.socket))  # fmt: skip
    assert got.exit_code == 0, got.output
    with out_csv.open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert (json.loads(row["local"]), json.loads(row["cloud"])) == ({"n": 1}, {"n": 3})

    # Unknown task: said, with the keys that exist, and nothing written.
    bad = tmp_path / "bad.csv"
    got = await cli("eval", "export-disagreements", "nosuch", "-o", str(bad),
                    "--socket", str(s.socket))  # fmt: skip
    assert got.exit_code == EXIT_CONFIG and not bad.exists()
    assert "no shadow data for 'nosuch'" in got.stderr and key in got.stderr


async def test_export_refuses_a_daemon_without_a_cloud(serve, tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model)
    got = await cli("eval", "export-disagreements", "t", "-o", str(tmp_path / "x.csv"),
                    "--socket", str(s.socket))  # fmt: skip
    assert got.exit_code == EXIT_FAILED and "no cloud configured" in got.stderr


@pytest.mark.parametrize("args", [["eval"], ["eval", "run"]], ids=["eval", "eval-run"])
def test_eval_target_still_runs_a_set_with_or_without_run(args: list[str], tmp_path: Path) -> None:
    # A TARGET that is no file and no task: the run command's own error, before any daemon.
    empty = tmp_path / "empty.toml"
    empty.touch()
    got = CliRunner().invoke(main, ["--config", str(empty), *args, str(tmp_path / "none.csv")])
    assert got.exit_code == EXIT_CONFIG
    assert "is neither a CSV file nor a config task" in got.stderr


async def test_the_eval_report_shows_the_live_agreement_of_its_key(
    serve, tiny_model, cloud, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.replies = [ok(LOCAL), ok(OTHER)]
    s = await serve(tiny_model, cloud=settings(url))
    await s.client.classify(TEXT, LABELS, routing="AUTO")
    await settled(s, 1)
    await s.client.classify(TEXT, LABELS, routing="AUTO")
    (a,) = (await settled(s, 2)).agreement
    data = tmp_path / "set.csv"
    data.write_text(f"text,label\n{TEXT},{LOCAL}\nwhat rate today,{OTHER}\n")
    empty = tmp_path / "empty.toml"
    empty.touch()
    got = await cli("--config", str(empty), "eval", str(data), "--json", "--socket", str(s.socket))
    assert got.exit_code == 0, got.output
    (live,) = json.loads(got.stdout)["live_agreement"]
    assert (live["key"], live["model"], live["agreed"], live["total"]) == (a.key, a.model, 1, 2)
    assert live["rate"] == 0.5 and live["low"] == pytest.approx(a.low)
    got = await cli("--config", str(empty), "eval", str(data), "--socket", str(s.socket))
    line = f"live agreement with the cloud, {a.key} ({a.model})"
    assert (
        line in got.stdout and f"0.500 [{a.low:.3f}, {a.high:.3f}] of 2 shadow pairs" in got.stdout
    )


async def test_a_task_with_target_accuracy_is_held_to_the_threshold_its_pairs_give(
    serve, tiny_model, cloud, short_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.default = ok("card_arrival")
    rows = [("where is my card", "card_arrival"), ("card not here yet", "card_arrival"),
            ("exchange rate today", "exchange_rate"), ("rate for dollars", "exchange_rate")]  # fmt: skip
    path = short_dir / "intents.csv"
    path.write_text("text,intent\n" + "".join(f"{t},{y}\n" for t, y in rows))
    task = TaskConfig("intents", path, label_column="intent", cascade=False, target_accuracy=0.9)
    s = await serve(tiny_model, cloud=settings(url), tasks=(task,))
    for _ in range(200):
        if (await s.client.status()).cloud.tasks.get("intents") == "ready":
            break
        await asyncio.sleep(0.05)
    (served,) = (await s.client.status()).models
    ref = f"{served.model.name}@{served.model.version}"
    # LOCAL_ONLY: the threshold is still said, and no shadow pair joins the 60 below.
    r = await s.client.classify("where is my card", task="intents", routing="LOCAL_ONLY")
    assert r.route.threshold_source == "cloud.classify_threshold"  # no pairs yet
    # 60 pairs as shadow traffic leaves them: sure answers agree, unsure ones half the time.
    sh = s.running.router.shadow
    for i in range(60):
        sure = i < 40
        sh.record("task:intents", ref, sure or i % 2 == 0, 0.95 if sure else 0.55, {})
    r = await s.client.classify("where is my card", task="intents", routing="LOCAL_ONLY")
    assert r.route.threshold == pytest.approx(0.95)
    assert r.route.threshold_source == (
        f"shadow (task:intents: target accuracy 0.9 from 60 pairs of {ref})"
    )
    out = await cli("status", "--socket", str(s.socket))
    line = f"recalibrated threshold task:intents ({ref}): 0.95 for target accuracy 0.9 from 60"
    assert line in out.output
    assert not script.received  # nothing was shadowed: every request was LOCAL_ONLY


async def test_shadow_calls_run_on_their_own_thread_and_loop_which_stop_with_the_daemon(
    serve, tiny_model, cloud
) -> None:  # type: ignore[no-untyped-def]
    import threading

    url, script = cloud
    script.default = ok(LOCAL)
    script.delay = 5.0  # still in flight when the daemon stops
    s = await serve(tiny_model, cloud=settings(url))
    assert not [t for t in threading.enumerate() if t.name == "shadow-loop"]  # none until used
    await s.client.classify(TEXT, LABELS, routing="AUTO")
    end = time.monotonic() + 5
    while not script.received:
        assert time.monotonic() < end, "the shadow call never reached the cloud"
        await asyncio.sleep(0.02)
    (thread,) = [t for t in threading.enumerate() if t.name == "shadow-loop"]
    router = s.running.router
    assert router._shadow_cloud is not None and router._shadow_cloud is not router.cloud
    t0 = time.monotonic()
    await s.running.stop(grace=0)
    assert time.monotonic() - t0 < 3  # the call in flight was cancelled, not awaited
    assert not thread.is_alive()
