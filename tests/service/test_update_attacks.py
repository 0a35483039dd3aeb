"""Attacks on updates through the real daemon (real llama.cpp workers on tiny GGUFs):

- an origin that trickles one byte a second (real loopback HTTP) must not hold the
  model's update lock forever: the fetch fails by its deadline with a clear reason, a
  caller that goes away cancels it, status shows it meanwhile, and a later apply resumes;
- deltas from a compromised or careless publisher key (signed, so they get as far as
  the rebuild) must be refused, recorded as bad, and replaced by the full file, without
  writing past the size the manifest declares.
"""

from __future__ import annotations

import asyncio
import json
import resource
import struct
import time
from pathlib import Path

import grpc
import pytest
import zstandard
from click.testing import CliRunner
from trickle import TrickleOrigin
from update_origin import Origin, apply, make_origin, start, wait_for

from sidecar.cli.commands import main
from sidecar.cli.support import EXIT_STOPPED
from sidecar.fileio import sha256_file
from sidecar.update import delta as dmod
from sidecar.v1 import inference_pb2 as pb

pytestmark = pytest.mark.asyncio


@pytest.fixture
def origin(tmp_path: Path, tiny_model: Path) -> Origin:
    return make_origin(tmp_path, tiny_model)


async def model_status(client) -> pb.ModelStatus:  # type: ignore[no-untyped-def]
    return (await client.status()).models[0]


# ---------------------------------------------------------------- a trickling origin


async def test_a_trickled_fetch_fails_by_its_deadline_and_the_next_apply_is_not_blocked(
    serve, origin: Origin
) -> None:  # type: ignore[no-untyped-def]
    with TrickleOrigin(origin.root, trickle=(".delta", ".gguf"), interval=1.0) as o:
        s = await start(serve, origin, o.url, fetch_deadline_seconds=3.0, retries=0)
        before = (await model_status(s.client)).model.version
        t0 = time.monotonic()
        run = asyncio.ensure_future(apply(s.client))

        # Meanwhile status shows the download in flight: bytes, age, deadline.
        async def fetching() -> str:
            shown = (await model_status(s.client)).update_fetch
            return shown if shown.startswith("fetching") else ""

        shown = await wait_for(fetching)
        assert "fetching" in shown and "bytes" in shown and "deadline in" in shown, shown
        cli = await asyncio.to_thread(
            CliRunner().invoke, main, ["status", "--socket", str(s.socket)]
        )
        assert "update in progress: fetching" in cli.output, cli.output

        with pytest.raises(grpc.aio.AioRpcError) as e:
            await run
        took = time.monotonic() - t0
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
        details = e.value.details() or ""
        assert "deadline of 3s" in details and "update.fetch_deadline_seconds" in details
        assert 2.5 < took < 30, took  # loose: a shared, noisy machine
        status = await model_status(s.client)
        assert "deadline" in status.last_update and status.update_fetch == ""
        assert status.model.version == before
        # The lock is free: the next apply runs (and meets the same deadline), it is not
        # refused as "already running".
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await apply(s.client)
        assert again.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "already running" not in (again.value.details() or "")
        assert "deadline" in (again.value.details() or "")
        # The partial stayed and the second attempt resumed it with a Range request.
        ranges = [r for p, r in o.requests if p.endswith(".delta")]
        assert ranges[0] == "" and ranges[1].startswith("bytes="), ranges


async def test_a_caller_that_goes_away_cancels_the_fetch_and_a_later_apply_resumes(
    serve, origin: Origin
) -> None:  # type: ignore[no-untyped-def]
    with TrickleOrigin(origin.root, trickle=(".delta", ".gguf"), interval=0.5) as o:
        s = await start(serve, origin, o.url, fetch_deadline_seconds=600.0)
        call = s.client.admin.ApplyUpdate(pb.UpdateRequest())

        async def got_bytes() -> bool:
            shown = (await model_status(s.client)).update_fetch
            return "fetching" in shown and not shown.split(": ", 1)[1].startswith("0 of")

        reader = asyncio.ensure_future(call.read())
        await wait_for(got_bytes)
        call.cancel()  # the CLI gave up (Ctrl-C, or its own timeout)
        reader.cancel()

        async def idle() -> bool:
            return (await model_status(s.client)).update_fetch == ""

        t0 = time.monotonic()
        await wait_for(idle, timeout=5)
        assert time.monotonic() - t0 < 15
        assert "cancelled" in (await model_status(s.client)).last_update
        # Lock free, partial kept: once the origin is fast again, the next apply resumes.
        o.trickle = ()
        steps = await apply(s.client)
        out = steps[-1].outcome
        assert out.installed and out.new_version == sha256_file(origin.v2)[:12]
        ranges = [r for p, r in o.requests if p.endswith(".delta")]
        assert len(ranges) == 2 and ranges[1].startswith("bytes="), ranges
        assert int(ranges[1][len("bytes=") : -1]) >= 1


async def test_a_cli_apply_that_gives_up_stops_the_fetch_and_frees_the_lock(
    serve, origin: Origin
) -> None:  # type: ignore[no-untyped-def]
    with TrickleOrigin(origin.root, trickle=(".delta", ".gguf"), interval=0.5) as o:
        s = await start(serve, origin, o.url, fetch_deadline_seconds=600.0)
        sock = str(s.socket)
        cli = await asyncio.to_thread(
            CliRunner().invoke, main, ["update", "apply", "--socket", sock, "--timeout", "1.5"]
        )
        assert cli.exit_code == EXIT_STOPPED and "stopped: the download stops" in cli.output, (
            cli.output
        )

        async def idle() -> bool:
            return (await model_status(s.client)).update_fetch == ""

        await wait_for(idle, timeout=15)
        # Before: "an update of 'default' is already running" until the trickle ended.
        again = await asyncio.to_thread(
            CliRunner().invoke, main, ["update", "apply", "--socket", sock, "--timeout", "1.5"]
        )
        assert "already running" not in again.output, again.output
        assert "stopped: the download stops" in again.output


# ---------------------------------------------------------------- hostile deltas


def _frame(base: Path, target: Path, head: dict[str, object], ops: bytes) -> bytes:
    h = {"base_sha256": sha256_file(base), "base_size": base.stat().st_size,
         "target_sha256": sha256_file(target), "target_size": target.stat().st_size,
         "mode": "gguf"} | head  # fmt: skip
    raw = json.dumps(h).encode()
    return dmod.MAGIC + struct.pack("<I", len(raw)) + raw + ops + bytes([dmod.END])


def _bomb(o: Origin) -> bytes:
    c = zstandard.ZstdCompressor(level=1).compressobj(size=1 << 30)
    z = b"".join([*(c.compress(bytes(1 << 20)) for _ in range(1024)), c.flush()])
    return _frame(o.v1, o.v2, {}, struct.pack("<BII", dmod.DATA, 100, len(z)) + z)


def _claims_50x(o: Origin) -> bytes:
    n = o.v1.stat().st_size
    ops = struct.pack("<BQQ", dmod.COPY, 0, n) * 50
    return _frame(o.v1, o.v2, {"target_size": 50 * o.v2.stat().st_size}, ops)


def _writes_past(o: Origin) -> bytes:
    n = o.v1.stat().st_size
    return _frame(o.v1, o.v2, {}, struct.pack("<BQQ", dmod.COPY, 0, n) * 50)


def _text_size(o: Origin) -> bytes:
    return _frame(o.v1, o.v2, {"target_size": f"{o.v2.stat().st_size / 1e6:.0f} MB"}, b"")


def _null_size(o: Origin) -> bytes:
    return _frame(o.v1, o.v2, {"base_size": None}, b"")


def _list_header(o: Origin) -> bytes:
    raw = json.dumps([sha256_file(o.v1), sha256_file(o.v2)]).encode()
    return dmod.MAGIC + struct.pack("<I", len(raw)) + raw + bytes([dmod.END])


@pytest.mark.parametrize(
    "hostile", [_bomb, _claims_50x, _writes_past, _text_size, _null_size, _list_header]
)
async def test_a_hostile_signed_delta_is_refused_remembered_and_the_full_file_installed(
    serve, origin: Origin, hostile
) -> None:  # type: ignore[no-untyped-def]
    bad = origin.list_delta(hostile(origin))
    declared = origin.manifest().size
    s = await start(serve, origin)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    steps = await apply(s.client)
    # The daemon runs in this process: a bomb's declared GiB would show in its peak RSS
    # (ru_maxrss never goes down, so this is loose, never flaky the other way).
    grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert grew_mib < 256, f"peak RSS grew {grew_mib:.0f} MiB"
    out = steps[-1].outcome
    assert out.installed and "full file" in out.plan and "delta failed" in out.plan, out.plan
    assert out.new_version == sha256_file(origin.v2)[:12]
    assert (await model_status(s.client)).model.version == out.new_version
    # Not a byte past the manifest's size was written while rebuilding.
    rebuilt = [p for p in steps if p.stage == "rebuilding"]
    assert all(p.done_bytes <= declared and p.total_bytes == declared for p in rebuilt)
    # The delta is remembered as bad: the next plan does not pick it again.
    state = json.loads((s.running.local.store.root / "updates" / "default" / "state.json")
                       .read_text())  # fmt: skip
    assert bad in state["bad_deltas"]
