"""LoRA adapters through the real daemon (gRPC on a socket, HTTP API, process workers on
tiny GGUFs): added and proven, selected per request, refused when they do not fit,
NOT_FOUND when unknown, swapped under load with no failed request, removed and gc'd."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc
import openai
import pytest
from openai_client import unix_client  # type: ignore[import-not-found]
from tiny_gguf import write_tiny_llama
from tiny_lora import write_lora

from sidecar.client import AsyncClient
from sidecar.fileio import sha256_file
from sidecar.update.delta import make_delta
from sidecar.v1 import inference_pb2 as pb

pytestmark = pytest.mark.asyncio


async def add(client: AsyncClient, path: Path, name: str = "fmt") -> pb.StoredVersion:
    return (await client.add_model(path, name=name, adapter_for="default")).version


async def gen(client: AsyncClient, adapter: str = "", prompt: str = "Hello w") -> pb.GenerateReply:
    return await client.generate(prompt, max_tokens=12, adapter=adapter)


async def test_an_added_adapter_serves_requests_that_name_it(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    s = await serve(
        tiny_model, slot_kind="process", workers=1, context=512, model_keys={"parallel": 2}
    )
    lora = write_lora(short_dir / "a.gguf", tiny_model, std=0.3)
    before = (await s.client.status()).models[0].footprint_bytes
    added = await add(s.client, lora)
    assert added.model == "default:fmt" and added.active and added.serving
    # The memory budget counts it: a worker holds its own copy of a loaded adapter.
    after = (await s.client.status()).models[0].footprint_bytes
    assert after - before == lora.stat().st_size
    bare, adapted = await gen(s.client), await gen(s.client, "fmt")
    assert adapted.text != bare.text  # the adapter changes the greedy output
    assert adapted.adapter.name == "fmt" and adapted.adapter.version == added.sha256[:12]
    assert adapted.model.version == bare.model.version  # the same base model answered
    assert not bare.HasField("adapter")
    # Bulk work (LOW priority, main's background lane) takes an adapter alike.
    low = await s.client.generate("Hello w", max_tokens=12, adapter="fmt", low_priority=True)
    assert low.text == adapted.text and low.adapter.version == adapted.adapter.version
    listed = {v.model: v for v in (await s.client.list_versions()).versions}
    assert listed["default:fmt"].sha256 == added.sha256
    # Chat, Classify and Extract take it too, and say so.
    chat = await s.client.chat([("user", "hi")], max_tokens=3, adapter="fmt")
    cls = await s.client.classify("some text", ["yes", "no"], adapter="fmt")
    flag = {"type": "object", "properties": {"flag": {"type": "boolean"}}, "required": ["flag"],
            "additionalProperties": False}  # fmt: skip
    ext = await s.client.extract("yes", flag, adapter="fmt", max_tokens=64)
    streams = [
        [c async for c in s.client.generate_stream("Hello w", max_tokens=12, adapter="fmt")],
        [c async for c in s.client.chat_stream([("user", "hi")], max_tokens=3, adapter="fmt")],
    ]
    assert "".join(c.text for c in streams[0]) == adapted.text  # the same run, streamed
    for reply in (chat, cls, ext, streams[0][-1].summary, streams[1][-1].summary):
        assert reply.adapter.version == added.sha256[:12]
    # The same file the store holds is what a worker applies: a restartless re-add is a no-op.
    assert (await add(s.client, lora)).sha256 == added.sha256


async def test_an_unknown_adapter_is_not_found_and_never_runs_bare(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    s = await serve(
        tiny_model, slot_kind="process", workers=1, context=512,
        http={"socket": str(short_dir / "h.sock")},
    )  # fmt: skip
    calls = [
        s.client.generate("hi", max_tokens=2, adapter="nope"),
        s.client.chat([("user", "hi")], max_tokens=2, adapter="nope"),
        s.client.classify("hi", ["a", "b"], adapter="nope"),
        s.client.extract("hi", {"type": "object"}, adapter="nope"),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no adapter named 'nope'" in (e.value.details() or "")
    # Classify by examples never runs the model's head: an adapter there is refused, not ignored.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.client.classify("hi", examples=[("a b", "x"), ("c d", "y")], adapter="nope")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "with labels alone" in (e.value.details() or "")
    for stream in (
        s.client.generate_stream("hi", max_tokens=2, adapter="nope"),
        s.client.chat_stream([("user", "hi")], max_tokens=2, adapter="nope"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            _ = [step async for step in stream]
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # A name no adapter can have is the caller's mistake, said as such.
    for bad in ("../fmt", "fmt@1", "a:b", "x" * 1000):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await s.client.generate("hi", max_tokens=2, adapter=bad)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert "bad adapter name" in (e.value.details() or "")
    http = unix_client(short_dir / "h.sock")
    try:
        with pytest.raises(openai.NotFoundError, match="no adapter named"):
            await http.completions.create(model="default:nope", prompt="x", max_tokens=1)
        with pytest.raises(openai.NotFoundError, match="no adapter named"):
            await http.chat.completions.create(
                model="default:nope", messages=[{"role": "user", "content": "x"}], max_tokens=1
            )
        lora = write_lora(short_dir / "a.gguf", tiny_model, std=0.3)
        added = await add(s.client, lora)
        reply = await http.completions.create(model="default:fmt", prompt="Hello w", max_tokens=12)
        grpc_reply = await gen(s.client, "fmt")
        assert reply.choices[0].text == grpc_reply.text
        assert reply.model == "default:fmt"
        extra = reply.model_extra or {}
        assert extra["sidecar"]["adapter_version"] == added.sha256[:12]
        # Listed as the name a request sends; the combined form's edge cases are 400s
        # that say what to send, never a run on the bare model.
        assert [m.id for m in (await http.models.list()).data] == ["default", "default:fmt"]
        assert (await http.models.retrieve("default:fmt")).id == "default:fmt"
        for model, why in [
            ("default:", "name the adapter after the ':'"),
            (":fmt", "name the model before the ':'"),
            ("default:fmt:x", "more than one ':'"),
            ("default:fmt@" + added.sha256[:12], "cannot choose an adapter's version"),
            ("default:../fmt", "bad model name"),
        ]:
            with pytest.raises(openai.BadRequestError, match=why):
                await http.completions.create(model=model, prompt="x", max_tokens=1)
        with pytest.raises(openai.BadRequestError, match="embeddings take no adapter"):
            await http.embeddings.create(model="default:fmt", input="x")
    finally:
        await http.close()
    assert (await gen(s.client)).text  # still serving


async def test_mismatched_adapters_are_refused_with_the_reason(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=512)
    other = write_tiny_llama(short_dir / "other.gguf", n_embd=32, n_head=2)
    cases = {
        # another model's adapter: its projections are 32 wide, the model's 64
        "dims": (
            write_lora(short_dir / "dims.gguf", other),
            grpc.StatusCode.FAILED_PRECONDITION,
            "blk.0.attn_k.weight is [64, 64] in model 'default'",
        ),
        "arch": (
            write_lora(short_dir / "arch.gguf", tiny_model, architecture="qwen2"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "for architecture 'qwen2', but model 'default' is 'llama'",
        ),
        "model": (tiny_model, grpc.StatusCode.INVALID_ARGUMENT, "not a LoRA adapter"),
        "rank": (
            write_lora(
                short_dir / "rank.gguf", tiny_model,
                shape_of=lambda name, o, i: (o, i + 2) if name.endswith("attn_q.weight") else (o, i),
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "attn_q.weight is [64, 64] in model 'default', but the adapter's lora_a is [66, 4]",
        ),
    }  # fmt: skip
    for what, (path, code, reason) in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await add(s.client, path, name=what)
        assert e.value.code() == code, what
        assert reason in (e.value.details() or ""), (what, e.value.details())
    versions = (await s.client.list_versions()).versions
    assert [v.model for v in versions] == ["default"]  # nothing was stored
    assert not list((s.running.local.store.root / "blobs").glob("*.partial"))
    assert (await gen(s.client)).text  # the daemon keeps serving


async def test_an_adapter_swapped_under_load_fails_no_request(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    s = await serve(
        tiny_model, slot_kind="process", workers=2, context=512, model_keys={"parallel": 2}
    )
    v1 = await add(s.client, write_lora(short_dir / "v1.gguf", tiny_model, seed=1, std=0.3))
    v1_text = (await gen(s.client, "fmt")).text
    v2_file = write_lora(short_dir / "v2.gguf", tiny_model, seed=2, std=0.3)
    stop = asyncio.Event()
    seen: list[tuple[str, str]] = []

    async def caller(adapter: str) -> None:
        while not stop.is_set():
            r = await gen(s.client, adapter)
            seen.append((r.adapter.version, r.text))

    load = [asyncio.create_task(caller(a)) for a in ("fmt", "fmt", "")]
    await asyncio.sleep(0.3)
    v2 = await add(s.client, v2_file)
    after = await gen(s.client, "fmt")
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*load)  # any failed request would raise here
    assert after.adapter.version == v2.sha256[:12] != v1.sha256[:12]
    texts = {v: t for v, t in seen if v}
    assert texts[v1.sha256[:12]] == v1_text
    assert texts.get(v2.sha256[:12], after.text) == after.text != v1_text
    listed = {(v.model, v.sha256): v for v in (await s.client.list_versions()).versions}
    assert listed[("default:fmt", v1.sha256)].previous
    assert listed[("default:fmt", v2.sha256)].active
    # Back to v1 by version (a swap of MODEL:ADAPTER), then v2 is the previous one.
    steps = [
        p
        async for p in s.client.admin.Swap(
            pb.SwapRequest(model="default:fmt", version=v1.sha256[:8])
        )
    ]
    assert steps[-1].ok and steps[-1].new.version == v1.sha256[:12]
    assert (await gen(s.client, "fmt")).text == v1_text


async def test_adapter_versions_are_removed_and_collected_like_models(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=512)
    store = s.running.local.store
    shas = [
        (await add(s.client, write_lora(short_dir / f"v{i}.gguf", tiny_model, seed=i))).sha256
        for i in range(3)
    ]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.client.admin.RemoveVersion(
            pb.RemoveVersionRequest(model="default:fmt", version=shas[2])
        )
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "is active" in (
        e.value.details() or ""
    )
    removed = (await s.client.admin.CollectGarbage(pb.CollectGarbageRequest())).removed
    assert list(removed) == [f"default:fmt@{shas[0][:12]}"]
    assert not store.blob(shas[0]).exists() and store.blob(shas[1]).exists()
    await s.client.admin.RemoveVersion(
        pb.RemoveVersionRequest(model="default:fmt", version=shas[1])
    )
    assert not store.blob(shas[1]).exists()
    assert (await gen(s.client, "fmt")).adapter.version == shas[2][:12]


async def test_an_adapter_that_fails_its_canary_is_quarantined_and_never_active(
    serve, tiny_model: Path, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=512)
    good = await add(s.client, write_lora(short_dir / "good.gguf", tiny_model, std=0.3))
    # The header checks mirror llama.cpp's loader, so a file that passes them and still
    # fails on a worker cannot be written on purpose here: the canary's verdict is replaced.
    import sidecar.engine.adapters as adapters

    async def refuse(pool, file):  # type: ignore[no-untyped-def]
        raise adapters.SwapRefused("canary", "did not run: simulated")

    monkeypatch.setattr(adapters, "prove", refuse)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await add(s.client, write_lora(short_dir / "bad.gguf", tiny_model, seed=5))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "canary" in (e.value.details() or "")
    assert any(p.suffix == ".reason" for p in s.running.local.store.quarantine_dir.iterdir())
    assert [v.sha256 for v in (await s.client.list_versions()).versions if ":" in v.model] == [
        good.sha256
    ]
    assert (await gen(s.client, "fmt")).adapter.version == good.sha256[:12]


async def test_an_adapter_dropped_in_the_model_folder_is_checked_proven_and_served(
    tiny_model: Path, short_dir: Path
) -> None:
    from dataclasses import replace

    from conftest import make_config, start_app  # type: ignore[import-not-found]

    drop = short_dir / "drop"
    config = make_config(short_dir, tiny_model, workers=1, context=512)
    config = replace(config, store=replace(config.store, drop=drop, auto_swap=True))
    running = await start_app(config)
    client = AsyncClient(config.server.socket)
    try:
        (drop / "default").mkdir(parents=True)
        write_lora(drop / "default" / ".tickets.gguf", tiny_model, std=0.3)
        (drop / "default" / ".tickets.gguf").rename(drop / "default" / "tickets.gguf")
        other = write_tiny_llama(short_dir / "other.gguf", n_embd=32, n_head=2)
        write_lora(drop / "default" / ".wrong.gguf", other)
        (drop / "default" / ".wrong.gguf").rename(drop / "default" / "wrong.gguf")
        loop = asyncio.get_running_loop()
        end = loop.time() + 30
        while len(running.drop.results) < 2:
            assert loop.time() < end, running.drop.results
            await asyncio.sleep(0.05)
        outcomes = " | ".join(running.drop.results)
        assert "default:tickets now serves" in outcomes, outcomes
        assert "'wrong.gguf': refused: " in outcomes and "other dimensions" in outcomes
        reply = await client.generate("Hello w", max_tokens=4, adapter="tickets")
        assert reply.adapter.name == "tickets"
        assert not list((drop / "default").iterdir())  # taken or set aside, both gone
    finally:
        await client.close()
        await running.stop()


async def test_the_cli_adds_lists_activates_and_removes_adapters(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    from click.testing import CliRunner

    from sidecar.cli.commands import main

    async def cli(*args: str) -> tuple[int, str]:
        r = await asyncio.to_thread(
            CliRunner().invoke, main, [*args, "--socket", str(short_dir / "s.sock")]
        )
        return r.exit_code, r.output

    s = await serve(tiny_model, slot_kind="process", workers=1, context=512)
    v = [write_lora(short_dir / f"v{i}.gguf", tiny_model, seed=i, std=0.3) for i in (1, 2)]
    code, out = await cli("models", "add", "--adapter-for", "default", str(v[0]), "--name", "t")
    assert code == 0 and out.startswith("added and serving default:t@"), out
    first = out.strip().rsplit("@", 1)[1]
    code, out = await cli("models", "add", "--adapter-for", "default", str(v[1]), "--name", "t")
    second = out.strip().rsplit("@", 1)[1]
    code, out = await cli("models")
    assert f"*A  default:t@{second}" in out and f"  P default:t@{first}" in out, out
    code, out = await cli("models", "activate", f"default:t@{first}")
    assert code == 0, out
    assert (await gen(s.client, "t")).adapter.version == first
    code, out = await cli("models", "remove", f"default:t@{second}")
    assert code == 0 and f"removed default:t@{second}" in out, out
    code, out = await cli(
        "models", "add", "--adapter-for", "default", str(tiny_model), "--name", "x"
    )
    assert code != 0 and "not a LoRA adapter" in out, out
    code, out = await cli("models", "add", "--adapter-for", "bad/name", str(v[0]), "--name", "x")
    assert code != 0 and "--adapter-for" in out, out


async def test_an_adapter_blob_changed_on_disk_is_not_served_after_a_restart(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=512)
    added = await add(s.client, write_lora(short_dir / "a.gguf", tiny_model, std=0.3))
    store = s.running.local.store
    await s.running.stop(grace=0)
    blob = store.blob(added.sha256)
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte of tensor data
    blob.write_bytes(bytes(data))
    s = await serve(tiny_model, slot_kind="process", workers=1, context=512)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await gen(s.client, "fmt")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert any("changed on disk" in p.read_text() for p in store.quarantine_dir.glob("*.reason"))
    assert (await gen(s.client)).text


def signing(folder: Path) -> tuple[Path, str, Path]:
    """A signing key file, its public key and an origin folder, for a test's updates."""
    from sidecar.update.manifest import generate_keypair

    private, public = generate_keypair()
    (folder / "signing.pem").write_bytes(private)
    return folder / "signing.pem", public, folder / "origin"


def adapter_origin(
    folder: Path, model: Path, seeds: tuple[int, int], rank: int = 4
) -> tuple[Path, Path, Path, int, dict[str, str]]:
    """An origin that publishes versions 1 and 2 of adapter `default:fmt` of `model`, with a
    delta between them: (origin, v1 file, v2 file, delta size, the model's update keys)."""
    from sidecar.update.manifest import publish

    key, public, origin = signing(folder)
    v1 = write_lora(folder / "v1.gguf", model, seed=seeds[0], std=0.3, rank=rank)
    v2 = write_lora(folder / "v2.gguf", model, seed=seeds[1], std=0.3, rank=rank)
    (origin / "deltas-fmt").mkdir(parents=True)
    make_delta(v1, v2, origin / "deltas-fmt" / "v1-v2.delta")
    delta_size = (origin / "deltas-fmt" / "v1-v2.delta").stat().st_size
    for version, file in ((1, v1), (2, v2)):
        publish(origin, name="default:fmt", version=version, key_path=key, file=file,
                deltas_dir="deltas-fmt")  # fmt: skip
    return origin, v1, v2, delta_size, {"update_origin": str(origin), "update_key": public}


async def test_an_adapter_is_updated_by_a_signed_delta_from_its_models_origin(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    from sidecar.update.manifest import generate_keypair, publish

    origin, v1, v2, delta_size, keys = adapter_origin(short_dir, tiny_model, (1, 2))
    s = await serve(tiny_model, slot_kind="process", workers=1, context=512, model_keys=keys)
    await add(s.client, v1)
    check = await s.client.check_update("default:fmt")
    assert check.update_available and check.download_bytes == delta_size < check.full_bytes
    outcome = await s.client.apply_update("default:fmt")
    assert outcome.installed and outcome.fetched_bytes == delta_size, outcome
    reply = await gen(s.client, "fmt")
    assert reply.adapter.version == sha256_file(v2)[:12]
    assert reply.text == (await gen(s.client, "fmt")).text
    again = await s.client.apply_update("default:fmt")
    assert not again.installed and "up to date" in again.plan
    # A manifest signed by another key is refused; the adapter keeps serving.
    other, _ = generate_keypair()
    (short_dir / "other.pem").write_bytes(other)
    publish(origin, name="default:fmt", version=4, key_path=short_dir / "other.pem",
            file=write_lora(short_dir / "v4.gguf", tiny_model, seed=4), deltas_dir="deltas-fmt")  # fmt: skip
    with pytest.raises(Exception, match="refused"):
        await s.client.apply_update("default:fmt")
    assert (await gen(s.client, "fmt")).adapter.version == sha256_file(v2)[:12]


async def test_the_eval_gate_scores_an_adapter_where_a_task_names_it(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    from dataclasses import replace

    from sidecar.config import TaskConfig

    # Each text twice, once per label: whatever the model answers, exactly half is right.
    golden = short_dir / "golden.csv"
    golden.write_text("text,label\n" + "".join(f"t{i},a\nt{i},b\n" for i in range(3)))
    task = TaskConfig(name="g", file=golden, eval_file=golden, adapter="fmt")
    s = await serve(
        tiny_model, slot_kind="process", workers=1, context=512, tasks=(task,),
        model_keys={"eval_min_accuracy": 0.6, "eval_max_regression": 0.0},
    )  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await add(s.client, write_lora(short_dir / "v1.gguf", tiny_model, seed=1, std=0.3))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "swap refused at eval: adapter 'fmt' scored 0.500 (3/6) on 'g'" in (
        e.value.details() or ""
    ) and "below eval_min_accuracy 0.6" in (e.value.details() or "")
    pool = s.running.local.pools["default"]
    pool.reconfigure(replace(pool.config, eval_min_accuracy=0.5))
    v2 = await add(s.client, write_lora(short_dir / "v2.gguf", tiny_model, seed=2, std=0.3))
    assert (await gen(s.client, "fmt")).adapter.version == v2.sha256[:12]
    scores = s.running.local.store.root / "eval" / "default:fmt" / "scores.json"
    assert v2.sha256 in scores.read_text()


async def test_an_adapter_update_its_eval_gate_refuses_is_rejected_as_eval(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    from dataclasses import replace

    from sidecar.config import TaskConfig

    # Each text twice, once per label: whatever the model answers, exactly half is right.
    golden = short_dir / "golden.csv"
    golden.write_text("text,label\n" + "".join(f"t{i},a\nt{i},b\n" for i in range(3)))
    task = TaskConfig(name="g", file=golden, eval_file=golden, adapter="fmt")
    _, v1, _, _, keys = adapter_origin(short_dir, tiny_model, (1, 2))
    s = await serve(
        tiny_model, slot_kind="process", workers=1, context=512, tasks=(task,),
        model_keys={**keys, "eval_min_accuracy": 0.5, "eval_max_regression": 0.0},
    )  # fmt: skip
    await add(s.client, v1)
    pool = s.running.local.pools["default"]
    pool.reconfigure(replace(pool.config, eval_min_accuracy=0.6))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.client.apply_update("default:fmt")
    assert "swap refused at eval" in (e.value.details() or ""), e.value.details()

    def rejected(reason: str) -> float:
        value = s.running.metrics.registry.get_sample_value(
            "sidecar_update_rejections_total", {"model": "default:fmt", "reason": reason}
        )
        return value or 0.0

    assert rejected("eval") == 1 and rejected("canary") == 0
    assert (await gen(s.client, "fmt")).adapter.version == sha256_file(v1)[:12]


async def test_adapters_survive_a_restart_and_never_run_on_a_model_they_do_not_fit(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    s = await serve(tiny_model, slot_kind="process", workers=1, context=512)
    added = await add(s.client, write_lora(short_dir / "a.gguf", tiny_model, std=0.3))
    before = await gen(s.client, "fmt")
    await s.running.stop(grace=0)
    s = await serve(tiny_model, slot_kind="process", workers=1, context=512)
    after = await gen(s.client, "fmt")
    assert after.text == before.text and after.adapter.version == added.sha256[:12]
    # The model is swapped to one of other dimensions: its adapter no longer fits, and a
    # request for it fails with the reason instead of running on the bare model.
    narrow = write_tiny_llama(short_dir / "narrow.gguf", n_embd=32, n_head=2, n_ctx=4096)
    steps = [p async for p in s.client.admin.Swap(pb.SwapRequest(path=str(narrow)))]
    assert steps[-1].ok
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await gen(s.client, "fmt")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "does not fit the file model 'default' serves now" in (e.value.details() or "")
    assert (await gen(s.client)).text  # the bare model still serves


async def test_an_adapter_installed_by_an_update_is_polled_like_its_model(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    from sidecar.update.manifest import publish

    key, public, origin = signing(short_dir)
    files = [write_lora(short_dir / f"v{i}.gguf", tiny_model, seed=i, std=0.3) for i in (1, 2)]
    publish(origin, name="default:fmt", version=1, key_path=key, file=files[0])
    keys = {"update_origin": str(origin), "update_key": public}
    s = await serve(tiny_model, slot_kind="process", workers=1, context=512, model_keys=keys,
                    update={"interval_seconds": 0.5})  # fmt: skip
    assert (await s.client.apply_update("default:fmt")).installed
    publish(origin, name="default:fmt", version=2, key_path=key, file=files[1])
    want = sha256_file(files[1])[:12]
    for _ in range(300):
        if (await gen(s.client, "fmt")).adapter.version == want:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the poll loop did not install v2")


async def test_a_config_tasks_label_scoring_runs_with_its_adapter_and_refits_per_version(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    from sidecar.config import TaskConfig

    rows = [(f"card {w}", "card") for w in "abcdef"] + [(f"pin {w}", "pin") for w in "abcdef"]
    data = short_dir / "t.csv"
    data.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    task = TaskConfig(name="t", file=data, label_scoring=True, cascade=False, adapter="fmt")
    plain = TaskConfig(name="p", file=data, label_scoring=False, adapter="fmt")
    s = await serve(tiny_model, slot_kind="process", workers=1, context=512, tasks=(task, plain))
    # Without label scoring no answer runs with an adapter: the task's own serves only its
    # eval gate (the reply names none), and one a request names is refused, not ignored.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.client.classify("card zzz", task="p", adapter="fmt")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "tasks.p.label_scoring = true" in (e.value.details() or "")
    for _ in range(400):
        with contextlib.suppress(grpc.aio.AioRpcError):  # UNAVAILABLE while prepared
            plain_reply = await s.client.classify("card zzz", task="p")
            break
        await asyncio.sleep(0.05)
    assert plain_reply.label and not plain_reply.HasField("adapter")

    async def classify() -> pb.ClassifyReply:
        for _ in range(400):
            try:
                return await s.client.classify("card zzz", task="t")
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:  # being prepared: retry
                    raise
            await asyncio.sleep(0.05)
        raise AssertionError("task t never became ready")

    with pytest.raises(grpc.aio.AioRpcError) as e:  # its adapter does not exist yet
        await classify()
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    v1 = await add(s.client, write_lora(short_dir / "v1.gguf", tiny_model, seed=1, std=0.3))
    assert (await classify()).adapter.version == v1.sha256[:12]
    v2 = await add(s.client, write_lora(short_dir / "v2.gguf", tiny_model, seed=2, std=0.3))
    # The weight fitted on v1's label scores is not v2's: the task is prepared again.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.client.classify("card zzz", task="t")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (await classify()).adapter.version == v2.sha256[:12]
