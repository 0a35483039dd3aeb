"""Staged rollout across a fleet, through real daemons and a real loopback HTTP origin
(tests/trickle.py, nothing trickled) serving manifests the real publisher signed.

A fleet is simulated as a few hundred identities asking one daemon's real CheckUpdate in
turn (the identity set live, as a reload would): the share that may update matches the
published fraction, and raising the fraction only adds daemons. Then single daemons show
what an operator sees: outside the cohort an automatic update waits without error, status,
`sidecar update check` and the metrics say why, and raising the rollout lets it in; a
manual canary overrides; a replayed or malformed rollout is refused.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from rollout_helpers import signed_over, within_binomial
from trickle import TrickleOrigin
from update_origin import Origin, apply, make_origin, start, wait_for

from sidecar.cli.commands import main
from sidecar.fileio import sha256_file
from sidecar.update import cohort, identity
from sidecar.update.manifest import _to_json, load_private_key, sign
from sidecar.update.state import State
from sidecar.v1 import inference_pb2 as pb

pytestmark = pytest.mark.asyncio

# A few hundred, as the issue asks; about 10 ms a check (a real HTTP fetch and verify each).
# 0 and 1, and a 10,000-identity fleet, are in tests/unit/test_cohort.py.
FLEET = [f"fleet-{i:03d}" for i in range(250)]
FRACTIONS = (0.1, 0.3, 0.7, 1.0)


@pytest.fixture
def origin(tmp_path: Path, tiny_model: Path) -> Origin:
    return make_origin(tmp_path, tiny_model)


def identity_at(low: float, high: float, version: int = 2) -> str:
    """An identity whose place in the rollout of `version` of 'default' is in [low, high)."""
    return next(
        i for i in (f"node-{n}" for n in range(10_000))
        if low <= cohort.position(i, "default", version) < high
    )  # fmt: skip


def gauge(served: Any, name: str) -> float | None:
    reg = served.running.metrics.registry
    return reg.get_sample_value(name, {"model": "default", "version": "2"})  # type: ignore[no-any-return]


def rejected_total(served: Any) -> float:
    reg = served.running.metrics.registry
    return sum(
        s.value
        for fam in reg.collect()
        if fam.name == "sidecar_update_rejections"
        for s in fam.samples
        if s.name.endswith("_total")
    )


async def cli(*args: str) -> Any:
    return await asyncio.to_thread(CliRunner().invoke, main, list(args))


async def test_a_fleet_updates_in_the_published_share_and_raising_it_only_adds(
    serve, origin: Origin
) -> None:  # type: ignore[no-untyped-def]
    with TrickleOrigin(origin.root) as http:
        # Checks only: the fake slot serves v1's file as well as a real worker would.
        keys = {"update_origin": http.url, "update_key": origin.public}
        s = await serve(origin.v1, model_keys=keys)
        base = s.running.config
        before: set[str] = set()
        shares = []
        for f in FRACTIONS:
            origin.publish(2, origin.v2, rollout=f)
            taking = set()
            for ident in FLEET:
                s.running.apply(replace(base, update=replace(base.update, identity=ident)))
                c = await s.client.admin.CheckUpdate(pb.UpdateRequest())
                assert (c.rollout.identity, c.rollout.version, c.rollout.fraction) == (ident, 2, f)
                assert c.update_available == c.rollout.in_cohort, c.detail
                if c.update_available:
                    assert c.plan.startswith("delta v1 -> v2")
                    taking.add(ident)
                else:
                    assert "not in the cohort yet" in c.detail, c.detail
            assert within_binomial(len(taking), len(FLEET), f), (f, len(taking))
            assert before <= taking, f"raising to {f} dropped {sorted(before - taking)[:5]}"
            before = taking
            shares.append(len(taking))
        assert shares[-1] == len(FLEET)
        assert shares == sorted(set(shares))  # each raise added daemons
        assert all(path == "default.manifest.json" for path, _ in http.requests)
        assert len(http.requests) == len(FLEET) * len(FRACTIONS)  # every check read the origin


async def test_outside_the_cohort_an_automatic_update_waits_and_joins_when_raised(
    serve, origin: Origin
) -> None:  # type: ignore[no-untyped-def]
    ident = identity_at(0.4, 0.6)
    origin.publish(2, origin.v2, rollout=0.2)
    with TrickleOrigin(origin.root) as http:
        s = await start(serve, origin, http.url, identity=ident, interval_seconds=0.3)
        v1 = (await s.client.status()).models[0].model.version

        async def said_not_yet() -> pb.ModelStatus | None:
            m = (await s.client.status()).models[0]
            return m if "not in the cohort yet" in m.last_update else None

        m = await wait_for(said_not_yet)
        assert m.model.version == v1 and m.rollout.identity == ident
        assert (m.rollout.version, m.rollout.fraction, m.rollout.in_cohort) == (2, 0.2, False)
        assert m.rollout.position == cohort.position(ident, "default", 2)
        assert "passes " + cohort.percent(m.rollout.position) in m.last_update
        # Waiting is not a failure: nothing is counted as refused, and nothing but the
        # manifest was fetched.
        assert rejected_total(s) == 0
        assert {path for path, _ in http.requests} == {"default.manifest.json"}
        assert gauge(s, "sidecar_update_in_cohort") == 0
        assert gauge(s, "sidecar_update_rollout_fraction") == 0.2
        assert gauge(s, "sidecar_update_rollout_position") == m.rollout.position
        sock = str(s.socket)
        check = await cli("update", "check", "--socket", sock)
        assert check.exit_code == 0, check.output
        assert (
            "v2 is published to 20% of daemons; this daemon is not in the cohort yet"
            in check.output
        )
        assert (
            f"NOT in the cohort yet (this daemon's place {cohort.percent(m.rollout.position)}, identity {ident})"
            in check.output
        )
        status = await cli("status", "--socket", sock)
        assert "rollout: v2 to 20% of daemons: NOT in the cohort yet" in status.output, (
            status.output
        )

        origin.publish(2, origin.v2, rollout=0.7)  # the operator raises it: this daemon joins

        async def updated() -> pb.ModelStatus | None:
            m = (await s.client.status()).models[0]
            return m if m.model.version != v1 else None

        m = await wait_for(updated)
        assert m.model.version == sha256_file(origin.v2)[:12]
        assert m.rollout.in_cohort and m.rollout.fraction == 0.7
        assert gauge(s, "sidecar_update_in_cohort") == 1
        check = await cli("update", "check", "--socket", sock)
        assert "up to date (v2)" in check.output and "in the cohort" in check.output


async def test_an_operator_can_canary_a_daemon_outside_the_cohort(serve, origin: Origin) -> None:  # type: ignore[no-untyped-def]
    ident = identity_at(0.5, 1.0)
    origin.publish(2, origin.v2, rollout=0.1)
    s = await start(serve, origin, identity=ident)
    sock = str(s.socket)
    plain = await cli("update", "apply", "--socket", sock)
    assert plain.exit_code == 0 and "not in the cohort yet" in plain.output, plain.output
    forced = await cli("update", "check", "--ignore-rollout", "--socket", sock)
    assert "v2 available (serving v1); would fetch delta v1 -> v2" in forced.output, forced.output
    done = await cli("update", "apply", "--ignore-rollout", "--socket", sock)
    assert done.exit_code == 0 and "ok: default v1 -> v2" in done.output, done.output
    m = (await s.client.status()).models[0]
    assert m.model.version == sha256_file(origin.v2)[:12]
    assert "outside its rollout cohort, by an operator's override" in m.last_update


async def test_a_replayed_earlier_copy_of_the_same_version_is_refused(
    serve, origin: Origin
) -> None:  # type: ignore[no-untyped-def]
    ident = identity_at(0.3, 0.6)
    origin.publish(2, origin.v2, rollout=0.1)
    earlier = origin.manifest_path.read_bytes()
    s = await start(serve, origin, identity=ident)
    origin.publish(2, origin.v2, rollout=0.9)
    assert (await s.client.admin.CheckUpdate(pb.UpdateRequest())).rollout.in_cohort
    # An attacker on the path serves the validly signed copy at 10% to hold this daemon back.
    origin.manifest_path.write_bytes(earlier)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.client.admin.CheckUpdate(pb.UpdateRequest())
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "replayed older manifest" in (e.value.details() or "")
    reg = s.running.metrics.registry
    labels = {"model": "default", "reason": "rollback"}
    assert reg.get_sample_value("sidecar_update_rejections_total", labels) == 1
    # What it learned stays: the rollout status is still the newest copy's.
    assert (await s.client.status()).models[0].rollout.fraction == 0.9


def _sign_with_rollout(o: Origin, value: object) -> None:
    """The origin's manifest, validly signed, with `value` as its rollout (a publisher bug)."""
    signed = _to_json(replace(o.manifest(), rollout=0.5))
    signed["rollout_ppm"] = value
    o.manifest_path.write_bytes(signed_over(signed, load_private_key(o.key)))


@pytest.mark.parametrize(
    ("value", "says"), [(-1, "got -1"), (1_500_000, "got 1500000"), (0.5, "got 0.5")]
)
async def test_a_signed_manifest_with_a_bad_rollout_is_refused_and_nothing_changes(
    serve, origin: Origin, value: object, says: str
) -> None:  # type: ignore[no-untyped-def]
    s = await start(serve, origin)
    v1 = (await s.client.status()).models[0].model.version
    _sign_with_rollout(origin, value)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await apply(s.client)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = e.value.details() or ""
    assert "'rollout_ppm' must be an integer from 0 to 1000000" in details and says in details
    m = (await s.client.status()).models[0]
    assert m.model.version == v1 and "rejected (malformed)" in m.last_update
    assert not m.HasField("rollout")  # nothing learned from a refused manifest
