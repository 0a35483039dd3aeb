"""The Admin seam (`sidecar.admin.DaemonAdmin`) called directly, as a second front end
would: the daemon's own admin object over fake slots, no gRPC in between."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_gguf import write_tiny_llama

from sidecar.domain.errors import FailedPrecondition, InvalidRequest, SwapRefused
from sidecar.domain.seam import Admin

pytestmark = pytest.mark.asyncio


def admin_of(served) -> Admin:  # type: ignore[no-untyped-def]
    admin: Admin = served.running.admin  # what a front end holds: the seam, nothing more
    return admin


async def test_a_swap_reports_progress_in_the_domain_shape_and_status_follows(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    s = await serve(tiny_model)
    admin = admin_of(s)
    before = admin.status()
    assert before.socket == str(s.socket) and before.cloud is not None
    (model,) = before.models
    assert model.is_default and model.pool.ready and model.probe_error is None
    steps: list[tuple[str, str, int, int]] = []

    def progress(stage: str, detail: str = "", done: int = 0, total: int = 0) -> None:
        steps.append((stage, detail, done, total))

    second = write_tiny_llama(short_dir / "second.gguf", seed=21, n_ctx=4096)
    result = await admin.swap("", "", second, "", progress)
    assert result.old == model.pool.model and result.new != result.old
    assert steps and steps[0][0] == "adding"
    (after,) = admin.status().models
    assert after.pool.model == result.new and "->" in after.pool.last_swap
    listing = await admin.versions()
    serving = [v.info.short for v in listing.versions if v.serving]
    assert serving == [result.new.version] and listing.root == s.running.local.store.root


async def test_the_store_through_the_seam_keeps_what_serves(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    s = await serve(tiny_model)
    admin = admin_of(s)
    serving = admin.models()[0].pool.model.version
    added = await admin.add_model("other", write_tiny_llama(short_dir / "o.gguf", seed=5))
    assert added.info.name == "other" and not added.serving
    with pytest.raises(FailedPrecondition):
        await admin.remove_version("", serving)  # active, and a worker serves it
    assert await admin.collect_garbage(empty_quarantine=False) == []
    await admin.remove_version("other", added.info.short)
    names = {(v.info.name, v.info.short) for v in (await admin.versions()).versions}
    assert names == {("default", serving)}


async def test_a_bad_name_or_file_is_refused_before_anything_changes(
    serve, tiny_model: Path, short_dir: Path
) -> None:
    s = await serve(tiny_model)
    admin = admin_of(s)
    version = admin.models()[0].pool.model.version
    with pytest.raises(InvalidRequest):
        await admin.swap("../x", "", None, "", lambda *_a, **_k: None)
    junk = short_dir / "junk.gguf"
    junk.write_bytes(b"not a model")
    with pytest.raises(SwapRefused):
        await admin.swap("", "", junk, "", lambda *_a, **_k: None)
    assert admin.models()[0].pool.model.version == version
