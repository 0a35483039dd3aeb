"""Getting the new file: fetch the plan's pieces resumably into the model's work folder and
rebuild through the delta chain, checking every step's sha256 against the signed manifest
(steps 3 and 4 of an update). A delta that fails is remembered and the full file fetched
instead."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from sidecar.domain.progress import Progress
from sidecar.update import delta, fetch
from sidecar.update.context import UpdateContext
from sidecar.update.manifest import Manifest
from sidecar.update.plan import Plan
from sidecar.update.threads import in_thread

log = logging.getLogger("sidecar.update")


def _size(path: Path) -> int:
    """Bytes a resumed download already has (a cheap stat, fine on the loop)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


async def obtain(
    ctx: UpdateContext, name: str, manifest: Manifest, plan: Plan, progress: Progress
) -> tuple[Path, int, str]:
    """A verified file with the manifest's hash, by the plan; a failing delta falls back to
    the full file. Returns the file, the bytes downloaded and how it came."""
    d = ctx.workdir(name)
    d.mkdir(parents=True, exist_ok=True)
    if not plan.full and not plan.steps:  # the store holds it already
        return ctx.engine.store.blob(plan.target_sha256), 0, "the store (no download)"
    fetched, how = 0, plan.describe()
    if not plan.full:
        try:
            file, fetched = await _rebuild(ctx, name, manifest, plan, progress)
            return file, fetched, how
        except delta.DeltaError as e:
            log.warning("update %s: delta failed (%s); fetching the full file", name, e)
            progress("fetching", f"the delta failed ({e}); fetching the full file", 0, 0)
            how = f"full file ({manifest.size} bytes) after the delta failed: {e}"
    partial = d / f"{manifest.sha256}.full.partial"
    full = manifest.full
    fetched += await _fetch(ctx, name, full.path, partial, full.size, full.sha256, progress)
    return partial, fetched, how


async def _fetch(
    ctx: UpdateContext,
    name: str,
    rel: str,
    partial: Path,
    size: int,
    sha: str,
    progress: Progress,
) -> int:
    m = ctx.model(name)
    cfg = ctx.engine.config.update
    before = _size(partial)
    loop = asyncio.get_running_loop()
    ctx.stage(name, "fetching")
    control = ctx.control(name, max(size - before, 0))

    def report(done: int, total: int) -> None:
        loop.call_soon_threadsafe(progress, "fetching", rel, done, total)

    store = ctx.engine.store  # an encrypted store's downloads are sealed as they come
    await in_thread(
        fetch.fetch_file,
        fetch.origin_url(m.update_origin, rel),
        partial,
        size=size,
        sha256=sha,
        timeout=cfg.timeout_seconds,
        retries=cfg.retries,
        progress=report,
        control=control,
        sink=store.download_sink(size),
        digest_of=store.download_digest,
    )
    got = max(size - before, 0)
    ctx.metrics.update_bytes.labels(name).inc(got)
    return got


async def _rebuild(
    ctx: UpdateContext, name: str, manifest: Manifest, plan: Plan, progress: Progress
) -> tuple[Path, int]:
    d = ctx.workdir(name)
    st = ctx.state(name)
    store = ctx.engine.store
    base = store.blob(plan.steps[0].from_sha256)
    fetched = 0
    loop = asyncio.get_running_loop()
    for step in plan.steps:
        dpart = d / f"{step.sha256}.delta.partial"
        done = d / f"{step.sha256}.delta"
        if not done.exists():
            fetched += await _fetch(ctx, name, step.path, dpart, step.size, step.sha256, progress)
            os.replace(dpart, done)
        out = d / f"{step.to_sha256}.rebuilt.partial"
        ctx.stage(name, "rebuilding")
        control = ctx.adopt(name, fetch.Control())  # local work: no deadline
        control.what = f"v{step.to_version}"

        def report(
            written: int, total: int, v: int = step.to_version, c: fetch.Control = control
        ) -> None:
            c.progress(written, total)
            c.check()  # abandoned: stop between two ops
            loop.call_soon_threadsafe(progress, "rebuilding", f"v{v}", written, total)

        # The sizes come from the signed manifest, never from the delta: the last step
        # must make exactly the manifest's file; a step between two versions the
        # manifest gives no size for gets a generous cap derived from it.
        if step.to_sha256 == manifest.sha256:
            caps: dict[str, int] = {"target_size": manifest.size}
        else:
            caps = {"max_size": 2 * max(manifest.size, _size(base)) + delta.PIECE}
        try:
            info = await asyncio.to_thread(delta.read_delta_info, done, store.open_plain)
            if (info.base_sha256, info.target_sha256) != (step.from_sha256, step.to_sha256):
                raise delta.DeltaError(
                    f"the delta turns {info.base_sha256[:12]} into "
                    f"{info.target_sha256[:12]}; the manifest lists it for "
                    f"{step.from_sha256[:12]} -> {step.to_sha256[:12]}"
                )
            # Through the store: an encrypted one decrypts the base and seals the target.
            got = await in_thread(
                delta.apply_delta,
                base,
                done,
                out,
                progress=report,
                read_old=store.open_plain,
                read_delta=store.open_plain,
                write_out=store.open_output,
                **caps,
            )
            if got != step.to_sha256:
                raise delta.DeltaError(
                    f"rebuilt v{step.to_version} has sha256 {got[:12]}, the manifest says "
                    f"{step.to_sha256[:12]}"
                )
        except delta.DeltaError:
            st.bad_deltas.append(step.sha256)
            st.save(ctx.state_path(name))
            out.unlink(missing_ok=True)
            done.unlink(missing_ok=True)
            raise
        if base.parent == d:
            base.unlink(missing_ok=True)  # an intermediate step's output
        base = out
    return base, fetched
