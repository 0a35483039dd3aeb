"""The eval gate on real models: SmolLM2 serves; a copy of it with a damaged tensor and
Gemma 3 (a real different model) are the candidates, scored on 16 Banking77 rows
(tests/data/banking77-gate).

Greedy label scoring is deterministic, so the scores (and so the verdicts) are too:
SmolLM2 gets 10 of 16, Gemma 3 8 of 16, and the damaged copy 4 of 16 (its output norm is
zeroed, so every label gets the same score and it answers like a constant). Context 256
keeps the KV caches small.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import GEMMA3, REPO

from sidecar.config import TaskConfig
from sidecar.v1 import inference_pb2 as pb

pytestmark = pytest.mark.asyncio

GOLDEN = REPO / "tests" / "data" / "banking77-gate" / "golden.csv"
BANK = TaskConfig(
    name="bank",
    file=GOLDEN,  # the examples file is required of a task; the gate reads only eval_file
    eval_file=GOLDEN,
    instruction="Which banking customer-support intent is this message about?",
)


def damaged(src: Path, dst: Path) -> Path:
    """A copy that loads and generates, with its final norm's weights zeroed (gguf package):
    every logit is 0, so every label scores the same whatever the text."""
    import gguf

    shutil.copyfile(src, dst)
    reader = gguf.GGUFReader(dst, "r+")
    (norm,) = [t for t in reader.tensors if t.name == "output_norm.weight"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32
    norm.data[...] = np.float32(0)
    reader.data.flush()
    del reader
    return dst


async def swap(client, **kw: str) -> list[pb.SwapProgress]:  # type: ignore[no-untyped-def]
    out = []
    async for p in client.admin.Swap(pb.SwapRequest(**kw)):
        out.append(p)
    return out


async def refused(client, **kw: str) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await swap(client, **kw)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    return e.value.details() or ""


def report_of(message: str) -> dict[str, Any]:
    return json.loads(Path(message.rsplit("report: ", 1)[1]).read_text())  # type: ignore[no-any-return]


async def test_gate_refuses_a_damaged_copy_and_takes_another_model_within_the_bars(
    serve, smollm2: Path, short_dir: Path
) -> None:
    if not GEMMA3.is_file():
        pytest.fail(f"{GEMMA3} is missing: run ./scripts/setup (it fetches the demo models)")
    bad = damaged(smollm2, short_dir / "damaged.gguf")
    s = await serve(
        smollm2,
        slot_kind="process",
        workers=2,
        threads=1,
        context=256,
        tasks=(BANK,),
        model_keys={"eval": "bank", "eval_min_accuracy": 0.4, "eval_max_regression": 0.2},
    )
    store = s.running.local.store
    serving = (await s.client.status()).models[0].model.version

    # The damaged copy passes the canary (it generates a token) but not the gate.
    msg = await refused(s.client, path=str(bad))
    assert msg.startswith("swap refused at eval: candidate ")
    assert f"serving {serving} scored 0.625 (10/16)" in msg
    assert "eval_min_accuracy 0.4, eval_max_regression 0.2: below eval_min_accuracy" in msg
    report = report_of(msg)
    assert not report["passed"] and report["candidate"]["rows"] == 16
    assert report["candidate"]["accuracy"] < 0.4 and not report["serving"]["cached"]
    assert len({a["answer"] for a in report["answers"]}) == 1  # a constant answer
    bad_sha = report["candidate"]["sha256"]
    assert f"candidate {bad_sha[:12]} scored {report['candidate']['accuracy']:.3f}" in msg
    reasons = [p.read_text() for p in store.quarantine_dir.glob("*.reason")]
    assert any(f"serving {serving} scored" in r and "report:" in r for r in reasons), reasons
    assert not any(v == bad_sha for v in store.versions("default"))
    # The old version never stopped serving.
    st = (await s.client.status()).models[0]
    assert st.model.version == serving and st.last_swap.startswith(
        f"refused {bad_sha[:12]} at eval"
    )
    reply = await s.client.classify("I lost my card", ["lost_or_stolen_card", "exchange_rate"])
    assert reply.model.version == serving

    # Gemma 3 scores lower than SmolLM2, but within both bars: it serves. The serving
    # score comes from the cache now: only the candidate is scored.
    steps = await swap(s.client, path=str(GEMMA3))
    details = [p.detail for p in steps if p.stage == "eval"]
    assert any(f"serving {serving} scored 0.625 (10/16) (cached)" in d for d in details)
    assert not any("once" in d for d in details)
    # Its score depends on how this CPU's kernels round Q4_K (8/16 on an Intel Xeon, 7/16 on
    # an AMD EPYC, both AVX-512): lower than SmolLM2's 10/16 and within both bars (>= 7/16).
    passed = [d for d in details if d.startswith("passed: candidate")]
    scored = [re.search(r"candidate \w+ scored [0-9.]+ \((\d+)/16\)", d) for d in passed]
    assert len(scored) == 1 and scored[0] is not None, details
    assert 7 <= int(scored[0].group(1)) < 10, details
    assert steps[-1].ok and steps[-1].new.version != serving
    assert (await s.client.status()).models[0].model.version == steps[-1].new.version
