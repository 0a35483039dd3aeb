"""One update of one model, start to end: check, obtain the file, install it into the
store, prove it by a swap (canary), and put it on probation (steps 1 to 6 of an update).

Partial files are never models: only `store.add` of a verified file makes one, and the
store's pointers are written atomically, so `kill -9` at any point leaves the serving
model intact; `State.pending` names an install that the next run resumes.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from sidecar.domain.errors import FailedPrecondition, SidecarError, SwapRefused, Unavailable
from sidecar.domain.progress import Progress
from sidecar.domain.updates import Outcome
from sidecar.update import fetch
from sidecar.update.check import check
from sidecar.update.context import UpdateContext
from sidecar.update.download import obtain
from sidecar.update.manifest import UpdateRejected
from sidecar.update.probation import Probation
from sidecar.update.probation import record as probation_record


async def apply_update(
    ctx: UpdateContext,
    probation: Probation,
    name: str,
    progress: Progress,
    ignore_rollout: bool = False,
) -> Outcome:
    progress("checking", f"reading the manifest of {name}", 0, 0)
    found = await check(ctx, name, in_job=True, ignore_rollout=ignore_rollout)
    manifest, plan, installed = found.manifest, found.plan, found.check.installed_version
    current = ctx.engine.pool(name).ref.version
    path = ctx.state_path(name)
    r = found.check.rollout
    if plan is None:
        st = ctx.state(name)
        if st.pending:
            # What was being fetched is not planned any more (out of the cohort, a newer
            # version, failed): its partial files would otherwise stay for ever.
            st.pending, st.pending_override = "", False
            st.save(path)
            await asyncio.to_thread(ctx.clean, name, {"state.json"})
        ctx.record(name, found.check.detail)
        return Outcome(name, installed, installed, current, found.check.detail, 0,
                       manifest.size, False)  # fmt: skip
    st = ctx.state(name)
    st.pending = manifest.sha256
    st.pending_override = r is not None and not r.in_cohort
    st.save(path)
    fetched = 0
    try:
        file, fetched, how = await obtain(ctx, name, manifest, plan, progress)
        job = ctx.jobs.get(name)
        if job is not None:
            job.control.check()  # abandoned in the last moment before install
            job.cancellable = False
        ctx.stage(name, "installing")
        progress("installing", f"adding v{manifest.version} to the store", 0, 0)
        # Held until the swap has run, so a `gc` in between cannot take it.
        store = ctx.engine.store
        if file == store.blob(manifest.sha256):  # stored already: no copy of a big file
            add = functools.partial(store.adopt, name, manifest.sha256, hold=True)
        else:
            add = functools.partial(store.add, file, name, expect_sha256=manifest.sha256, hold=True)
        sha = await asyncio.to_thread(add)
        if file.parent == ctx.workdir(name):  # never a store blob we started from
            file.unlink(missing_ok=True)
    except UpdateRejected as e:
        ctx.reject(name, e.reason, e.message)
        raise FailedPrecondition(f"update of {name!r} refused: {e.message}") from None
    except fetch.Aborted as e:
        raise ctx.aborted(name, e) from None
    except fetch.FetchError as e:
        ctx.metrics.update_rejections.labels(name, "fetch").inc()
        ctx.record(name, f"download failed (will resume): {e}", level=logging.WARNING)
        raise Unavailable(
            f"update of {name!r}: download failed, it resumes next time: {e}"
        ) from None
    except SidecarError as e:  # the store refused the file (not a valid GGUF)
        ctx.fail(name, manifest.sha256, "validation", e.message)
        raise FailedPrecondition(f"update of {name!r} refused: {e.message}") from None
    previous = ctx.engine.pool(name).ref.version
    # Measured before the flip, on live requests only: probation compares the new p99 to it.
    previous_p99 = ctx.engine.pool(name).latencies.p99(previous)
    ctx.stage(name, "swapping")
    progress("swapping", f"proving v{manifest.version} before it serves", 0, 0)

    def swapping(stage: str, detail: str = "", done: int = 0, total: int = 0) -> None:
        # The swap reports stage and detail only; every progress call here passes all four.
        progress(stage, detail, done, total)

    try:
        result = await ctx.engine.swap(name, version=sha, progress=swapping)
    except SwapRefused as e:
        # Recorded as failed either way: a candidate the gate refused is not fetched again.
        ctx.fail_refused(name, manifest.sha256, e)
        raise
    finally:
        ctx.engine.store.release(sha)
    healthy_seconds = ctx.engine.config.update.healthy_seconds
    st = ctx.state(name)
    st.pending, st.pending_override = "", False
    st.installed_version, st.installed_sha256 = manifest.version, sha
    st.probation = probation_record(
        sha, manifest.version, previous, installed, healthy_seconds, previous_p99
    )
    st.save(path)
    probation.begin(name)
    ctx.metrics.updates.labels(name, "delta" if how.startswith("delta") else "full").inc()
    ctx.clean(name, keep={"state.json"})
    outside = " (outside its rollout cohort, by an operator's override)"
    ctx.record(
        name,
        f"installed v{manifest.version} ({sha[:12]}) via {how}; "
        f"fetched {fetched} bytes of {manifest.size}"
        + (outside if r is not None and not r.in_cohort else "")
        + result.misfit_note(),
    )
    progress("probation", f"v{manifest.version} serves; watching it for {healthy_seconds:.0f}s",
             0, 0)  # fmt: skip
    return Outcome(name, installed, manifest.version, sha[:12], how, fetched, manifest.size, True)
