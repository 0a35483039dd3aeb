"""The eval gate on every promotion path (swap, replace strategy, drop folder, delta update)
and probation's latency watch, on a real daemon with fake slots whose answers and speed
depend on the file they serve: fast to run, and the verdicts are known in advance.
(tests/service/test_eval_gate_models.py runs the gate on real models.)"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest
from tiny_gguf import write_tiny_llama
from update_origin import Origin, apply, make_origin, wait_for

from sidecar.config import TaskConfig
from sidecar.domain.types import Classification, ClassifyTask, LabelScore, Result, Task, Usage
from sidecar.engine import local
from sidecar.engine.fake import FakeSlot
from sidecar.fileio import sha256_file
from sidecar.v1 import inference_pb2 as pb

pytestmark = pytest.mark.asyncio

LABELS = ("abc", "mno", "xyz")


class Judged(FakeSlot):
    """A fake worker that answers every golden row right, unless its file is in `wrong`
    (then always the last label: 1 row in 3), and answers slowly if its file is in `slow`."""

    wrong: ClassVar[set[str]] = set()
    slow: ClassVar[set[str]] = set()

    async def _answer(self, job_id: int, task: Task, stream: bool) -> Result:
        sha = self.spec.path.stem
        if sha in self.slow:
            await asyncio.sleep(0.05)
        if isinstance(task, ClassifyTask) and set(task.labels) == set(LABELS):
            label = LABELS[-1] if sha in self.wrong else task.text
            score = LabelScore(label, 1.0, 0.0)
            return Classification(label, (score,), Usage(1, 1))
        return await super()._answer(job_id, task, stream)


@pytest.fixture(autouse=True)
def judged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(local.SLOT_KINDS, "fake", Judged)
    Judged.wrong, Judged.slow = set(), set()


@pytest.fixture
def golden(tmp_path: Path) -> TaskConfig:
    path = tmp_path / "golden.csv"
    path.write_text("text,label\n" + "".join(f"{lb},{lb}\n" for lb in LABELS * 3))
    return TaskConfig(name="g", file=path, eval_file=path)


def model(tmp_path: Path, seed: int, *, wrong: bool = False) -> Path:
    path = write_tiny_llama(tmp_path / f"m{seed}.gguf", seed=seed, n_ctx=4096)
    if wrong:
        Judged.wrong.add(sha256_file(path))
    return path


GATE = {"eval": "g", "eval_min_accuracy": 0.5, "eval_max_regression": 0.1}


async def swap(client, **kw: str) -> list[pb.SwapProgress]:  # type: ignore[no-untyped-def]
    return [p async for p in client.admin.Swap(pb.SwapRequest(**kw))]


async def refused(client, **kw: str) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await swap(client, **kw)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    return e.value.details() or ""


async def serving(client) -> str:  # type: ignore[no-untyped-def]
    return (await client.status()).models[0].model.version  # type: ignore[no-any-return]


def swaps_refused_at_eval(served: Any) -> float:
    value = served.running.metrics.registry.get_sample_value(
        "sidecar_swaps_total", {"model": "default", "outcome": "refused", "stage": "eval"}
    )
    return value or 0.0


async def test_a_worse_candidate_is_refused_quarantined_and_the_old_keeps_serving(
    serve, tiny_model: Path, tmp_path: Path, golden: TaskConfig
) -> None:
    s = await serve(tiny_model, tasks=(golden,), model_keys=GATE)
    store = s.running.local.store
    old = await serving(s.client)
    old_sha = store.active("default")
    bad = model(tmp_path, 2, wrong=True)
    bad_sha = sha256_file(bad)

    msg = await refused(s.client, path=str(bad))
    assert (
        f"swap refused at eval: candidate {bad_sha[:12]} scored 0.333 (3/9) on 'g', serving "
        f"{old} scored 1.000 (9/9); bars: eval_min_accuracy 0.5, eval_max_regression 0.1: "
        "below eval_min_accuracy 0.5; report: "
    ) in msg
    report = json.loads(Path(msg.rsplit("report: ", 1)[1]).read_text())
    assert report["candidate"]["sha256"] == bad_sha and not report["passed"]
    assert report["serving"] == {"sha256": old_sha, "accuracy": 1.0, "correct": 9, "rows": 9,
                                 "cached": False}  # fmt: skip
    assert [a["answer"] for a in report["answers"]] == ["xyz"] * 9
    # Quarantined with the reason, out of the store's versions; the old version serves.
    (reason,) = store.quarantine_dir.glob(f"*{bad_sha}*.reason")
    assert "scored 0.333 (3/9)" in reason.read_text() and "report:" in reason.read_text()
    assert bad_sha not in store.versions("default")
    status = (await s.client.status()).models[0]
    assert status.model.version == old and status.ready
    assert status.last_swap.startswith(f"refused {bad_sha[:12]} at eval: candidate")
    assert (await s.client.generate("hi", max_tokens=2)).model.version == old
    assert swaps_refused_at_eval(s) == 1
    # Both scores are cached per version, with the golden set's digest.
    cache = json.loads((store.root / "eval" / "default" / "scores.json").read_text())
    assert {k: v["correct"] for k, v in cache.items()} == {old_sha: 9, bad_sha: 3}


async def test_the_regression_bar_and_the_cache_of_the_serving_score(
    serve, tiny_model: Path, tmp_path: Path, golden: TaskConfig
) -> None:
    keys = {**GATE, "eval_min_accuracy": 0.0, "eval_max_regression": 0.5}
    s = await serve(tiny_model, tasks=(golden,), model_keys=keys)
    old = await serving(s.client)
    # 0.333 is 0.667 below the serving 1.0: beyond a regression of 0.5 (no floor is set).
    msg = await refused(s.client, path=str(model(tmp_path, 2, wrong=True)))
    assert "more than eval_max_regression 0.5 below the serving version" in msg

    # A good candidate: the serving score comes from the cache (not scored again).
    good = model(tmp_path, 3)
    steps = await swap(s.client, path=str(good))
    evals = [p.detail for p in steps if p.stage == "eval"]
    assert evals[0] == f"serving {old} scored 1.000 (9/9) (cached)"
    assert evals[-1].startswith(f"passed: candidate {sha256_file(good)[:12]} scored 1.000 (9/9)")
    assert steps[-1].ok and await serving(s.client) == sha256_file(good)[:12]

    # The golden set changes: cached scores are stale, so the serving one is scored again.
    rows = Path(golden.eval_file or "").read_text()
    Path(golden.eval_file or "").write_text(rows + "abc,abc\n")
    steps = await swap(s.client, version=old)
    evals = [p.detail for p in steps if p.stage == "eval"]
    assert evals[0].startswith(f"scoring the serving version {sha256_file(good)[:12]} once")
    assert "scored 1.000 (10/10)" in evals[-1] and steps[-1].ok


async def test_the_replace_strategy_restarts_the_old_model_when_the_gate_refuses(
    serve, tiny_model: Path, tmp_path: Path, golden: TaskConfig
) -> None:
    s = await serve(tiny_model, tasks=(golden,), model_keys=GATE)
    old = await serving(s.client)
    msg = await refused(s.client, path=str(model(tmp_path, 2, wrong=True)), strategy="replace")
    assert "swap refused at eval" in msg and f"serving {old} scored 1.000 (9/9)" in msg
    status = (await s.client.status()).models[0]
    assert status.model.version == old and status.ready
    assert (await s.client.generate("hi", max_tokens=2)).model.version == old


async def test_a_rollback_or_a_model_without_a_gate_runs_no_eval(
    serve, tiny_model: Path, tmp_path: Path, golden: TaskConfig
) -> None:
    s = await serve(tiny_model, tasks=(golden,))  # no models.NAME.eval
    steps = await swap(s.client, path=str(model(tmp_path, 2, wrong=True)))
    assert steps[-1].ok and not [p for p in steps if p.stage == "eval"]
    assert not (s.running.local.store.root / "eval").exists()


async def test_a_dropped_file_below_the_bar_is_refused_and_quarantined(
    serve, tiny_model: Path, tmp_path: Path, short_dir: Path, golden: TaskConfig
) -> None:
    from sidecar.dropwatch import DropWatcher

    s = await serve(tiny_model, tasks=(golden,), model_keys=GATE)
    old = await serving(s.client)
    bad = model(tmp_path, 2, wrong=True)
    drop = short_dir / "drop"
    watcher = DropWatcher(s.running.local, drop, auto_swap=True)
    await watcher.start()
    try:
        (drop / "next.gguf").write_bytes(bad.read_bytes())
        await wait_for(lambda: _async(watcher.results))
        assert "refused" in watcher.results[0] and "scored 0.333 (3/9)" in watcher.results[0]
    finally:
        await watcher.close()
    assert not (drop / "next.gguf").exists()
    store = s.running.local.store
    assert list(store.quarantine_dir.glob(f"*{sha256_file(bad)}*.reason"))
    assert await serving(s.client) == old


async def _async(value: Any) -> Any:
    return value


@pytest.fixture
def origin(tmp_path: Path, tiny_model: Path) -> Origin:
    return make_origin(tmp_path, tiny_model)


def rejections(served: Any, reason: str) -> float:
    value = served.running.metrics.registry.get_sample_value(
        "sidecar_update_rejections_total", {"model": "default", "reason": reason}
    )
    return value or 0.0


async def test_an_update_the_gate_refuses_is_recorded_failed_and_not_retried(
    serve, origin: Origin, golden: TaskConfig
) -> None:
    Judged.wrong.add(sha256_file(origin.v2))
    keys = {"update_origin": str(origin.root), "update_key": origin.public, **GATE}
    s = await serve(origin.v1, tasks=(golden,), model_keys=keys)
    v1 = await serving(s.client)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await apply(s.client)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "swap refused at eval" in (e.value.details() or "")
    assert await serving(s.client) == v1 and rejections(s, "eval") == 1
    state = json.loads(
        (s.running.local.store.root / "updates" / "default" / "state.json").read_text()
    )
    assert "scored 0.333 (3/9)" in state["failed"][sha256_file(origin.v2)]
    reports = s.running.local.store.root / "eval" / "default" / "reports"
    made = {p.name: p.stat().st_mtime_ns for p in reports.iterdir()}
    # The next apply does not fetch or evaluate it again.
    again = await apply(s.client)
    assert not again[-1].outcome.installed and "failed before" in again[-1].outcome.plan
    assert {p.name: p.stat().st_mtime_ns for p in reports.iterdir()} == made
    assert rejections(s, "eval") == 1


async def test_probation_rolls_back_a_version_much_slower_than_the_one_it_replaced(
    serve, origin: Origin
) -> None:
    Judged.slow.add(sha256_file(origin.v2))
    keys = {"update_origin": str(origin.root), "update_key": origin.public,
            "probation_latency_factor": 3.0}  # fmt: skip
    s = await serve(origin.v1, model_keys=keys, update={"healthy_seconds": 60})
    v1 = await serving(s.client)
    for _ in range(25):  # the previous version's p99, before the flip
        await s.client.generate("hi", max_tokens=1)
    await apply(s.client)
    v2 = await serving(s.client)
    assert v2 != v1
    for _ in range(25):  # 50 ms each against a fraction of a millisecond
        await s.client.generate("hi", max_tokens=1)

    async def rolled_back() -> str:
        return (await s.client.status()).models[0].last_rollback  # type: ignore[no-any-return]

    text = await wait_for(rolled_back)
    assert text.startswith(f"v2 ({v2}) rolled back to {v1} at ")
    assert "p99 latency" in text and "more than 3x the previous version's" in text
    assert await serving(s.client) == v1
    reg = s.running.metrics.registry
    labels = {"model": "default", "cause": "latency"}
    assert reg.get_sample_value("sidecar_update_rollbacks_total", labels) == 1


async def test_probation_keeps_a_version_as_fast_as_the_one_it_replaced(
    serve, origin: Origin
) -> None:
    keys = {"update_origin": str(origin.root), "update_key": origin.public,
            "probation_latency_factor": 3.0}  # fmt: skip
    s = await serve(origin.v1, model_keys=keys, update={"healthy_seconds": 1.5})
    Judged.slow.add(sha256_file(origin.v1))  # the old one was slow: the new one is faster
    for _ in range(25):
        await s.client.generate("hi", max_tokens=1)
    await apply(s.client)
    v2 = await serving(s.client)
    for _ in range(25):
        await s.client.generate("hi", max_tokens=1)

    async def passed() -> bool:
        return "healthily" in (await s.client.status()).models[0].last_update

    assert await wait_for(passed)
    status = (await s.client.status()).models[0]
    assert status.model.version == v2 and not status.last_rollback
