"""Few-shot Classify replies say who answered and how long it took, like every other reply:
the model's name@version as Status reports it, and daemon-side timings."""

from __future__ import annotations

import asyncio
import csv
from pathlib import Path

import grpc
import pytest
from tiny_gguf import write_tiny_llama

from sidecar.config import TaskConfig
from sidecar.v1 import inference_pb2 as pb

pytestmark = pytest.mark.asyncio

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


def intents_task(folder: Path) -> TaskConfig:
    path = folder / "intents.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "intent"])
        w.writerows(ROWS)
    # No cascade: the model embeds every request, so its work shows in the reply.
    return TaskConfig("intents", path, "text", "intent", "", "", -1.0, False, cascade=False)


async def until_ready(client, task: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(200):
        if (await client.status()).cloud.tasks.get(task) == "ready":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task} never became ready")


def assert_timed(r: pb.ClassifyReply) -> None:
    t = r.timings
    assert t.queue_ms > 0 and t.total_ms > 0, t
    assert t.total_ms >= t.queue_ms, t
    assert t.first_token_ms == t.total_ms, t  # a classification is one answer


async def test_a_task_reply_names_the_model_status_reports_and_is_timed(
    serve, tiny_model: Path, short_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model, tasks=(intents_task(short_dir),))
    await until_ready(s.client, "intents")
    (served,) = (await s.client.status()).models
    r = await s.client.classify("my card has still not arrived", task="intents")
    assert r.usage.prompt_tokens > 0  # the model embedded the text
    assert (r.model.name, r.model.version) == (served.model.name, served.model.version)
    assert r.model.version  # not an empty ref
    assert_timed(r)


async def test_an_examples_reply_names_the_model_status_reports_and_is_timed(
    serve, tiny_model: Path
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model)
    (served,) = (await s.client.status()).models
    # An unseen text shares no words with the examples: the words alone cannot be sure,
    # so the model embeds it.
    r = await s.client.classify("zzz qqq", examples=ROWS)
    assert (r.model.name, r.model.version) == (served.model.name, served.model.version)
    assert r.timings.total_ms > 0 and r.timings.total_ms >= r.timings.queue_ms
    assert r.timings.first_token_ms == r.timings.total_ms


async def test_after_a_swap_replies_name_the_new_version(
    serve, tiny_model: Path, short_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    second = write_tiny_llama(tmp_path / "tiny2.gguf", seed=2, n_ctx=4096)
    s = await serve(tiny_model, tasks=(intents_task(short_dir),))
    await until_ready(s.client, "intents")
    old = (await s.client.classify("where is my card", task="intents")).model.version
    steps = [p async for p in s.client.admin.Swap(pb.SwapRequest(path=str(second)))]
    assert steps[-1].ok, steps[-1]
    new = steps[-1].new.version
    assert new != old
    # The task's vectors belong to the old model: the first request after the swap finds
    # it being prepared again (the cache is keyed on the version), then it is the new one.
    for _ in range(200):
        try:
            r = await s.client.classify("where is my card", task="intents")
            break
        except grpc.aio.AioRpcError as e:  # while the new model embeds the examples
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            assert "being prepared" in (e.details() or ""), e
            await asyncio.sleep(0.05)
    else:
        raise AssertionError("the task never came back after the swap")
    assert r.model.version == new == (await s.client.status()).models[0].model.version
    assert_timed(r)
    # The out-of-scope calibration was fitted again with the rest, on the new model's vectors.
    assert r.HasField("novelty") and 0.0 <= r.novelty <= 1.0
