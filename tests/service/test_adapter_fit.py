"""A swap of a base model checks the model's active LoRA adapters against the new file, on
every promotion path (swap by path and by version, both strategies, the drop folder, a
signed update, a restart), through the real daemon (gRPC, process workers on tiny GGUFs):
the swap proceeds, an adapter that no longer fits is reported (swap reply, status,
`sidecar models`, the drop outcome, the update's record) and requests for it fail fast
with FAILED_PRECONDITION and what to do, never reaching a worker; a fitting version added
or activated afterwards clears it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import openai
import pytest
from openai_client import unix_client  # type: ignore[import-not-found]
from tiny_gguf import write_tiny_llama
from tiny_lora import write_lora
from update_origin import Origin, apply  # type: ignore[import-not-found]

from sidecar.client import AsyncClient
from sidecar.update.manifest import generate_keypair
from sidecar.v1 import inference_pb2 as pb

pytestmark = pytest.mark.asyncio

WIDE_REASON = "in model 'default', but the adapter's lora_a is [64, 4]"
HOW = "sidecar models add --adapter-for default FILE --name fmt"


@pytest.fixture(scope="module")
def narrow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model of other dimensions than the tiny one (32 wide, not 64)."""
    d = tmp_path_factory.mktemp("narrow")
    return write_tiny_llama(d / "narrow.gguf", n_embd=32, n_head=2, n_ctx=4096)


async def _add(client: AsyncClient, path: Path) -> pb.StoredVersion:
    return (await client.add_model(path, name="fmt", adapter_for="default")).version


async def _swap(client: AsyncClient, **kw: str) -> pb.SwapProgress:
    steps = [p async for p in client.admin.Swap(pb.SwapRequest(**kw))]
    assert steps[-1].ok, steps[-1]
    return steps[-1]


async def _refused(client: AsyncClient) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.generate("Hello w", max_tokens=2, adapter="fmt")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
    return e.value.details() or ""


async def _adapter(client: AsyncClient) -> pb.AdapterStatus:
    (model,) = (await client.status()).models
    (adapter,) = model.adapters
    return adapter


async def test_a_swap_to_a_file_its_adapter_does_not_fit_reports_it_and_requests_fail_fast(
    serve, tiny_model: Path, short_dir: Path, narrow: Path
) -> None:
    from click.testing import CliRunner

    from sidecar.cli.commands import main

    s = await serve(tiny_model, slot_kind="process", workers=1, context=512)
    wide_v = await _add(s.client, write_lora(short_dir / "wide.gguf", tiny_model, std=0.3))
    wide = (await s.client.status()).models[0].model.version
    # A file of the same dimensions (other weights): the adapter still fits.
    same = write_tiny_llama(short_dir / "same.gguf", seed=7, n_ctx=4096)
    done = await _swap(s.client, path=str(same))
    assert list(done.adapters_not_fitting) == []
    assert (await s.client.generate("Hello w", max_tokens=2, adapter="fmt")).adapter.name == "fmt"
    # A file of other dimensions: the swap proceeds and says which adapter no longer fits.
    done = await _swap(s.client, path=str(narrow))
    (misfit,) = done.adapters_not_fitting
    assert misfit.startswith("fmt: ") and WIDE_REASON in misfit, misfit
    assert done.detail.endswith(f"; adapters that do not fit it: {misfit}"), done.detail
    status = (await s.client.status()).models[0]
    assert f"adapters that do not fit it: {misfit}" in status.last_swap
    requests_before = sum(w.requests for w in status.workers)
    details = await _refused(s.client)
    assert WIDE_REASON in details and HOW in details and "swap the model back" in details
    status = (await s.client.status()).models[0]
    assert sum(w.requests for w in status.workers) == requests_before  # no worker saw it
    assert status.restarts == 0
    adapter = await _adapter(s.client)
    assert adapter.version == wide_v.sha256[:12] and WIDE_REASON in adapter.not_fitting
    listed = {v.model: v for v in (await s.client.list_versions()).versions}
    assert WIDE_REASON in listed["default:fmt"].not_fitting
    assert listed["default"].not_fitting == ""
    for args in (["status"], ["models"]):
        r = await asyncio.to_thread(
            CliRunner().invoke, main, [*args, "--socket", str(short_dir / "s.sock")]
        )
        assert r.exit_code == 0 and "DOES NOT FIT" in r.output and WIDE_REASON in r.output, r.output
    assert (await s.client.generate("Hello w", max_tokens=2)).text  # the bare model serves
    # A version made for the new file clears it.
    narrow_v = await _add(s.client, write_lora(short_dir / "narrow-lora.gguf", narrow, std=0.3))
    assert (await _adapter(s.client)).not_fitting == ""
    reply = await s.client.generate("Hello w", max_tokens=2, adapter="fmt")
    assert reply.adapter.version == narrow_v.sha256[:12]
    # Back to the wide model by version (strategy replace): now the narrow version does not fit.
    done = await _swap(s.client, version=wide, strategy="replace")
    (misfit,) = done.adapters_not_fitting
    assert "in model 'default', but the adapter's lora_a is [32, 4]" in misfit, misfit
    assert "[32, 4]" in await _refused(s.client)
    # Activating a version made for another file is refused by the header check, with the
    # reason; activating the one that fits clears it.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _swap(s.client, model="default:fmt", version=narrow_v.sha256[:12])
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "[32, 4]" in (e.value.details() or "")
    await _swap(s.client, model="default:fmt", version=wide_v.sha256[:12])
    assert (await _adapter(s.client)).not_fitting == ""
    reply = await s.client.generate("Hello w", max_tokens=2, adapter="fmt")
    assert reply.adapter.version == wide_v.sha256[:12]


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
async def test_an_adapter_that_does_not_fit_stays_marked_after_a_restart(
    serve, tiny_model: Path, short_dir: Path, narrow: Path, encrypted: bool
) -> None:
    # On an encrypted store the headers are read through decryption.
    env = {"SIDECAR_STORE_ENCRYPTION": "on", "SIDECAR_STORE_KEY": "3c" * 32} if encrypted else None
    s = await serve(tiny_model, slot_kind="process", workers=1, context=512, env=env)
    await _add(s.client, write_lora(short_dir / "wide.gguf", tiny_model, std=0.3))
    done = await _swap(s.client, path=str(narrow))
    assert WIDE_REASON in done.adapters_not_fitting[0]
    assert s.running.local.store.encrypt is encrypted
    await s.running.stop(grace=0)
    # The config still names the wide file; the store's active version (narrow) serves.
    s = await serve(tiny_model, slot_kind="process", workers=1, context=512, env=env,
                    http={"socket": str(short_dir / "h.sock")})  # fmt: skip
    assert WIDE_REASON in (await _adapter(s.client)).not_fitting
    assert WIDE_REASON in await _refused(s.client)
    # Every request kind that takes an adapter, streams and the OpenAI API (400) alike.
    calls = [
        s.client.chat([("user", "hi")], max_tokens=2, adapter="fmt"),
        s.client.classify("hi", ["a", "b"], adapter="fmt"),
        s.client.extract("hi", {"type": "object"}, adapter="fmt"),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert WIDE_REASON in (e.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        _ = [c async for c in s.client.generate_stream("hi", max_tokens=2, adapter="fmt")]
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    http = unix_client(short_dir / "h.sock")
    try:
        with pytest.raises(openai.BadRequestError, match="does not fit the file model"):
            await http.completions.create(model="default:fmt", prompt="x", max_tokens=1)
    finally:
        await http.close()


async def test_a_dropped_model_file_reports_the_adapters_it_does_not_fit(
    serve, tiny_model: Path, short_dir: Path, narrow: Path
) -> None:
    from sidecar.dropwatch import DropWatcher

    s = await serve(tiny_model, slot_kind="process", workers=1, context=512)
    await _add(s.client, write_lora(short_dir / "wide.gguf", tiny_model, std=0.3))
    drop = short_dir / "drop"
    watcher = DropWatcher(s.running.local, drop, auto_swap=True)
    await watcher.start()
    try:
        (drop / ".next.gguf").write_bytes(narrow.read_bytes())
        (drop / ".next.gguf").rename(drop / "next.gguf")
        loop = asyncio.get_running_loop()
        end = loop.time() + 30
        while not watcher.results:
            assert loop.time() < end
            await asyncio.sleep(0.05)
        (outcome,) = watcher.results
        assert "default now serves" in outcome and "adapters that do not fit it: fmt: " in outcome
        assert WIDE_REASON in outcome
    finally:
        await watcher.close()
    assert WIDE_REASON in await _refused(s.client)


async def test_a_model_update_reports_the_adapters_the_new_version_does_not_fit(
    serve, tiny_model: Path, short_dir: Path, narrow: Path
) -> None:
    private, public = generate_keypair()
    (short_dir / "signing.pem").write_bytes(private)
    (short_dir / "origin").mkdir()
    o = Origin(short_dir / "origin", short_dir / "signing.pem", public, tiny_model, narrow)
    o.publish(1, tiny_model)
    o.publish(2, narrow)
    keys = {"update_origin": str(o.root), "update_key": o.public}
    s = await serve(tiny_model, slot_kind="process", workers=1, context=512, model_keys=keys)
    await _add(s.client, write_lora(short_dir / "wide.gguf", tiny_model, std=0.3))
    steps = await apply(s.client)
    assert steps[-1].outcome.installed
    assert any(p.stage == "adapters" and "does not fit" in p.detail for p in steps), steps
    last = (await s.client.status()).models[0].last_update
    assert "adapters that do not fit it: fmt: " in last and WIDE_REASON in last, last
    assert WIDE_REASON in await _refused(s.client)


async def test_an_adapter_added_during_a_swap_never_serves_unchecked(
    serve, tiny_model: Path, short_dir: Path, narrow: Path
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=512)
    lora = write_lora(short_dir / "wide.gguf", tiny_model, std=0.3)
    swapping = asyncio.ensure_future(_swap(s.client, path=str(narrow)))
    await asyncio.sleep(0.05)  # the swap is under way (adding the file, loading, canary)
    try:
        await _add(s.client, lora)
        added = True
    except grpc.aio.AioRpcError as e:
        # Checked against the narrow file after the flip: refused with the header's reason.
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert WIDE_REASON in (e.details() or ""), e.details()
        assert "swap refused at validating" in (e.details() or "")
        added = False
    done = await swapping
    if added:  # before the swap's check: the swap found it does not fit
        assert WIDE_REASON in done.adapters_not_fitting[0]
        assert WIDE_REASON in await _refused(s.client)
    else:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await s.client.generate("Hello w", max_tokens=2, adapter="fmt")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await s.client.status()).models[0].restarts == 0


async def test_a_swap_and_an_adapter_activation_of_an_unloaded_on_demand_model_both_finish(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    # The order that deadlocked: the swap holds the model's load lock (busy adding its
    # file), the activation's canary waits for the on-demand load that lock blocks.
    s = await serve(tiny_model, slot_kind="process", workers=1, context=512,
                    model_keys={"load": "on_demand"})  # fmt: skip
    engine = s.running.local
    assert (await s.client.status()).models[0].state == "unloaded"
    same = write_tiny_llama(short_dir / "same.gguf", seed=7, n_ctx=4096)
    lora = write_lora(short_dir / "wide.gguf", tiny_model, std=0.3)
    load_lock = engine._locks["default"]
    await load_lock.acquire()  # both line up behind it: the swap first, then the load
    try:
        swapping = asyncio.ensure_future(_swap(s.client, path=str(same)))
        while not load_lock._waiters:  # the swap waits for it
            await asyncio.sleep(0.01)
        adding = asyncio.ensure_future(_add(s.client, lora))
        while len(load_lock._waiters) < 2:  # and the canary's load
            await asyncio.sleep(0.01)
    finally:
        load_lock.release()
    done, added = await asyncio.wait_for(asyncio.gather(swapping, adding), 60)
    assert done.ok and added.sha256
    adapter = await _adapter(s.client)
    assert adapter.version == added.sha256[:12] and adapter.not_fitting == ""
    reply = await s.client.generate("Hello w", max_tokens=2, adapter="fmt")
    assert reply.adapter.version == added.sha256[:12]


@pytest.mark.parametrize("strategy", ["side_by_side", "replace"])
async def test_a_swap_holds_the_adapter_lock_only_around_its_flip(
    serve, tiny_model: Path, short_dir: Path, strategy: str
) -> None:
    # An adapter activation waits for that lock: never behind the swap's loading, canary
    # or drain (up to store.drain_seconds).
    s = await serve(tiny_model, slot_kind="process", workers=1, context=512)
    await _add(s.client, write_lora(short_dir / "wide.gguf", tiny_model, std=0.3))
    engine = s.running.local
    lock = engine.adapters.lock("default")
    held: dict[str, bool] = {}

    def progress(stage: str, _detail: str) -> None:
        held[stage] = held.get(stage, False) or lock.locked()

    same = write_tiny_llama(short_dir / "same.gguf", seed=7, n_ctx=4096)
    result = await engine.swap("default", path=same, strategy=strategy, progress=progress)
    assert result.adapters_not_fitting == ()
    assert {"loading", "canary", "flipping", "done"} <= held.keys(), held
    assert held["adapters"], held  # the check before the flip is under it
    assert not any(v for k, v in held.items() if k != "adapters"), held
    assert not lock.locked()


async def test_requests_queued_before_a_flip_their_adapter_does_not_fit_fail_fast(
    serve, tiny_model: Path, short_dir: Path, narrow: Path
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=512)
    await _add(s.client, write_lora(short_dir / "wide.gguf", tiny_model, std=0.3))
    engine = s.running.local
    pool = engine.pool("default")
    queued: list[asyncio.Future[object]] = []
    depth: dict[str, int] = {}

    def progress(stage: str, _detail: str) -> None:
        if stage == "loading":  # paused (strategy replace): requests wait in the queue
            for _ in range(2):
                queued.append(asyncio.ensure_future(
                    s.client.generate("Hello w", max_tokens=2, adapter="fmt")))  # fmt: skip
        if stage == "flipping":
            depth["before"] = pool.status().queue_depth

    result = await engine.swap("default", path=narrow, strategy="replace", progress=progress)
    assert WIDE_REASON in result.adapters_not_fitting[0]
    assert depth["before"] == 2  # they were queued when the flip came
    for request in queued:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await request
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert WIDE_REASON in (e.value.details() or "") and HOW in (e.value.details() or "")
    status = (await s.client.status()).models[0]
    assert sum(w.requests for w in status.workers) == 1  # the canary: no worker saw them
    assert pool.adapter_failures == {}  # not the adapter version's failures
