"""Signed delta updates through the real Admin RPCs: a real daemon in this loop with real
llama.cpp workers on tiny GGUF models, and an origin folder written by the real publisher
code. (tests/e2e/test_update_e2e.py does the same over real HTTP with nginx and kill -9.)"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import grpc
import pytest
from tiny_gguf import write_tiny_llama
from update_origin import Origin, apply, make_origin, start

from sidecar.domain.errors import Unavailable
from sidecar.fileio import sha256_file
from sidecar.update.manifest import generate_keypair
from sidecar.v1 import inference_pb2 as pb

pytestmark = pytest.mark.asyncio


@pytest.fixture
def origin(tmp_path: Path, tiny_model: Path) -> Origin:
    return make_origin(tmp_path, tiny_model)


async def refused(client) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await apply(client)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
    return e.value.details() or ""


async def serving(client) -> str:  # type: ignore[no-untyped-def]
    return (await client.status()).models[0].model.version


def rejections(served, reason: str) -> float:  # type: ignore[no-untyped-def]
    value = served.running.metrics.registry.get_sample_value(
        "sidecar_update_rejections_total", {"model": "default", "reason": reason}
    )
    return value or 0.0


async def test_a_metadata_delta_is_fetched_rebuilt_verified_and_swapped_in(serve, origin) -> None:  # type: ignore[no-untyped-def]
    s = await start(serve, origin)
    v1 = await serving(s.client)
    check = await s.client.admin.CheckUpdate(pb.UpdateRequest())
    assert check.update_available and check.installed_version == 1 and check.available_version == 2
    assert check.plan.startswith("delta v1 -> v2")
    steps = await apply(s.client)
    stages = [p.stage for p in steps]
    assert stages[0] == "checking" and "fetching" in stages and "rebuilding" in stages
    assert stages.index("rebuilding") < stages.index("swapping") < stages.index("done")
    out = steps[-1].outcome
    assert out.installed and (out.from_version, out.to_version) == (1, 2)
    delta_size = next((origin.root / "deltas").glob("*.delta")).stat().st_size
    assert out.fetched_bytes == delta_size < 4096 < out.full_bytes
    want = sha256_file(origin.v2)[:12]
    assert out.new_version == want and await serving(s.client) == want != v1
    assert (await s.client.generate("hi", max_tokens=2)).model.version == want
    status = (await s.client.status()).models[0]
    assert "installed v2" in status.last_update
    # No partial file is left behind, and a second run has nothing to do.
    workdir = s.running.local.store.root / "updates" / "default"
    assert sorted(p.name for p in workdir.iterdir()) == ["state.json"]
    again = await apply(s.client)
    assert not again[-1].outcome.installed and "up to date" in again[-1].outcome.plan


def _tamper_manifest(o: Origin) -> None:
    doc = json.loads(o.manifest_path.read_text())
    doc["signed"]["version"] = 3  # a bigger version, but the signature no longer covers it
    o.manifest_path.write_text(json.dumps(doc))


def _wrong_key(o: Origin) -> None:
    private, _public = generate_keypair()
    o.key.write_bytes(private)  # re-signed by a key the daemon does not trust
    o.publish(3, o.v2)


def _expired(o: Origin) -> None:
    o.publish(3, o.v2, expires_days=-1)


def _wrong_name(o: Origin) -> None:
    o.publish(1, o.v2, name="other")  # a valid manifest for another model, put in our place
    (o.root / "other.manifest.json").replace(o.manifest_path)


def _tampered_delta(o: Origin) -> None:
    d = next((o.root / "deltas").glob("*.delta"))
    data = bytearray(d.read_bytes())
    data[-5] ^= 0xFF
    d.write_bytes(bytes(data))


def _oversized_delta(o: Origin) -> None:
    d = next((o.root / "deltas").glob("*.delta"))
    with d.open("ab") as f:
        f.write(b"\0" * 100_000)


@pytest.mark.parametrize(
    ("tamper", "reason", "says"),
    [
        (_tamper_manifest, "signature", "signature"),
        (_wrong_key, "signature", "signature"),
        (_expired, "expired", "expired"),
        (_wrong_name, "wrong_name", "other"),
        (_tampered_delta, "hash", "sha256"),
        (_oversized_delta, "size", "the manifest says 4"),
    ],
)
async def test_each_attack_is_refused_and_the_model_keeps_serving(
    serve, origin, tamper, reason, says
) -> None:  # type: ignore[no-untyped-def]
    s = await start(serve, origin)
    before = await serving(s.client)
    tamper(origin)
    details = await refused(s.client)
    assert says in details.lower() or says in details
    assert await serving(s.client) == before
    assert (await s.client.generate("still here", max_tokens=1)).model.version == before
    assert rejections(s, reason) == 1
    assert reason in (await s.client.status()).models[0].last_update
    assert not [p for p in s.running.local.store.root.rglob("*.partial")]


async def test_an_older_version_is_a_rollback_attack(serve, origin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s = await start(serve, origin)
    await apply(s.client)  # now at v2
    at_v2 = await serving(s.client)
    # The attacker replays a validly signed, unexpired manifest of v1.
    fresh = tmp_path / "replay"
    (fresh / "deltas").mkdir(parents=True)
    replay = Origin(fresh, origin.key, origin.public, origin.v1, origin.v2)
    replay.publish(1, origin.v1)
    replay.manifest_path.replace(origin.manifest_path)
    (fresh / "files").rename(origin.root / "files-replay")
    details = await refused(s.client)
    assert "version" in details.lower()
    assert rejections(s, "rollback") == 1 and await serving(s.client) == at_v2


async def test_a_delta_that_does_not_apply_falls_back_to_the_full_file(
    serve, origin, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # A publisher bug: the delta was made from another build (a different seed) but is
    # listed as starting from v1. The signature is fine; applying it is not.
    other = write_tiny_llama(tmp_path / "other.gguf", seed=7)
    wrong = origin.make(other, origin.v2)
    origin.list_delta(wrong.read_bytes())
    s = await start(serve, origin)
    steps = await apply(s.client)
    out = steps[-1].outcome
    assert out.installed and "full file" in out.plan and "delta failed" in out.plan
    assert out.new_version == sha256_file(origin.v2)[:12] == await serving(s.client)
    assert out.fetched_bytes >= out.full_bytes


async def test_a_new_version_whose_worker_dies_in_probation_is_rolled_back(serve, origin) -> None:  # type: ignore[no-untyped-def]
    s = await start(serve, origin, healthy_seconds=60)
    v1 = await serving(s.client)
    await apply(s.client)
    v2 = await serving(s.client)
    assert v2 != v1
    pid = (await s.client.status()).models[0].workers[0].pid
    os.kill(pid, signal.SIGKILL)  # the new version "crashes" during probation
    for _ in range(300):
        if "rolled back" in (await s.client.status()).models[0].last_update:
            break
        await asyncio.sleep(0.05)
    assert await serving(s.client) == v1
    assert rejections(s, "unhealthy") == 1
    status = (await s.client.status()).models[0]
    assert "rolled back" in status.last_update
    # v2 is remembered as bad: it is not installed again by the next check.
    again = await apply(s.client)
    assert not again[-1].outcome.installed and "failed before" in again[-1].outcome.plan
    assert await serving(s.client) == v1
    # Nothing goes upstream, so the operator's own monitoring must see why: status keeps
    # the rollback apart from `last update` (which the check above overwrote), and the
    # metrics count it by cause.
    status = (await s.client.status()).models[0]
    assert "failed before" in status.last_update
    assert status.last_rollback.startswith(f"v2 ({v2}) rolled back to {v1} at ")
    assert "unhealthy within 60s: 1 worker restart(s)" in status.last_rollback
    reg = s.running.metrics.registry
    causes = {c: reg.get_sample_value("sidecar_update_rollbacks_total",
                                      {"model": "default", "cause": c})
              for c in ("worker_died", "probe_failed", "rollback_failed")}  # fmt: skip
    assert causes == {"worker_died": 1.0, "probe_failed": 0.0, "rollback_failed": 0.0}


async def test_a_rollback_that_fails_is_shown_and_counted(
    serve, origin, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    s = await start(serve, origin, healthy_seconds=60)
    v1 = await serving(s.client)
    await apply(s.client)
    v2 = await serving(s.client)

    async def refuse(name: str, version: str = "", **_: object) -> None:
        raise Unavailable(f"not enough memory to load {version}")

    monkeypatch.setattr(s.running.local, "swap", refuse)
    os.kill((await s.client.status()).models[0].workers[0].pid, signal.SIGKILL)
    reg = s.running.metrics.registry
    labels = {"model": "default", "cause": "rollback_failed"}
    for _ in range(300):
        if reg.get_sample_value("sidecar_update_rollbacks_total", labels):
            break
        await asyncio.sleep(0.05)
    # The unhealthy version still serves: as plain to the operator as a rollback that worked.
    status = (await s.client.status()).models[0]
    assert await serving(s.client) == v2
    assert status.last_rollback.startswith(f"rollback of v2 ({v2}) to {v1} failed at ")
    assert "not enough memory" in status.last_rollback
    assert "1 worker restart(s)" in status.last_rollback
    assert reg.get_sample_value("sidecar_update_rollbacks_total", labels) >= 1


async def test_probation_passes_quietly_when_the_new_version_stays_healthy(serve, origin) -> None:  # type: ignore[no-untyped-def]
    s = await start(serve, origin, healthy_seconds=0.5)
    await apply(s.client)
    v2 = await serving(s.client)
    for _ in range(100):
        if "healthily" in (await s.client.status()).models[0].last_update:
            break
        await asyncio.sleep(0.05)
    assert "healthily" in (await s.client.status()).models[0].last_update
    assert await serving(s.client) == v2


async def test_update_without_an_origin_is_a_clear_failed_precondition(
    serve, tiny_model: Path
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.client.admin.CheckUpdate(pb.UpdateRequest())
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "models.default.update_origin" in (e.value.details() or "")


async def test_an_install_cut_short_by_a_crash_resumes_at_start(
    serve, origin, short_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    # What kill -9 during a rebuild leaves: the pending mark and a half-written output.
    work = short_dir / "store" / "updates" / "default"
    work.mkdir(parents=True)
    target = sha256_file(origin.v2)
    (work / f"{target}.rebuilt.partial").write_bytes(b"GGUF half a model")
    (work / "state.json").write_text(json.dumps({"pending": target, "highest_version": 2}))
    s = await start(serve, origin)
    # The store never took the partial file: the old version serves...
    assert await serving(s.client) == sha256_file(origin.v1)[:12]
    # ...and the update resumes by itself, without anyone asking.
    for _ in range(200):
        if "installed v2" in (await s.client.status()).models[0].last_update:
            break
        await asyncio.sleep(0.05)
    assert await serving(s.client) == target[:12]
    assert sorted(p.name for p in work.iterdir()) == ["state.json"]
