"""Signed delta updates of a LoRA adapter ("MODEL:ADAPTER"), from its model's origin.

The origin publishes `MODEL:ADAPTER.manifest.json` (`sidecar update publish --name
MODEL:ADAPTER`), signed with the model's update key; its deltas lead from one adapter
version to the next. The steps are a model update's (`install`), with the adapter's own
end: the manifest is verified (signature, name, expiry, no rollback), the cheapest plan
starts from any stored version (adapter versions included), the file is fetched or rebuilt
with the same bounded memory and checked against the manifest's sha256, then it is checked
against the model like any adapter (`store.adapters.add`), proven on a worker and made
active (`engine.adapters.activate`). Requests already running keep the version they had.
Then it is on probation like a model (`probation`): the version it replaced comes back if
the model's workers die, its probe fails, a worker fails a request with it, or (with
`probation_latency_factor`) the requests for the adapter get that much slower. A first version (nothing replaced) has no
probation: there is nothing to roll back to.

The poll loop (`updater`) polls an adapter once an update installed it; before that it is
updated when asked (`sidecar update apply`).
"""

from __future__ import annotations

import asyncio
import logging

from sidecar.domain.errors import FailedPrecondition, SidecarError, SwapRefused, Unavailable
from sidecar.domain.progress import Progress
from sidecar.domain.updates import Outcome
from sidecar.engine import adapters as adapter_swap
from sidecar.store import adapters
from sidecar.update import cohort, fetch
from sidecar.update.check import Found, _found, held, read_manifest
from sidecar.update.context import UpdateContext
from sidecar.update.download import obtain
from sidecar.update.plan import cheapest
from sidecar.update.probation import Probation
from sidecar.update.probation import record as probation_record

log = logging.getLogger("sidecar.update")


def _current(ctx: UpdateContext, base: str, name: str) -> str:
    file = ctx.engine.adapters.get(base, name)
    return file.sha256 if file is not None else ""


async def check(
    ctx: UpdateContext, target: str, *, in_job: bool = False, ignore_rollout: bool = False
) -> Found:
    split = adapters.split(target)
    assert split is not None
    base = ctx.engine.pool(split[0]).config.name
    name = f"{base}:{split[1]}"
    m = ctx.model(name)
    manifest, st, fraction = await read_manifest(ctx, m, name, in_job=in_job)
    me = await ctx.identity_now()
    r = cohort.rollout(me.value, name, manifest.version, fraction)
    current = _current(ctx, base, split[1])
    installed = next((v for v, sha in manifest.versions.items() if sha == current), 0)
    if manifest.sha256 == current:
        return _found(name, manifest, installed, None, f"up to date (v{manifest.version})", r)
    if manifest.sha256 in st.failed:
        why = st.failed[manifest.sha256]
        return _found(name, manifest, installed, None,
                      f"v{manifest.version} failed before: {why}", r)  # fmt: skip
    if not r.in_cohort and not ignore_rollout:
        return _found(name, manifest, installed, None, cohort.describe(r), r)
    plan = cheapest(manifest, await asyncio.to_thread(held, ctx), avoid=frozenset(st.bad_deltas))
    return _found(name, manifest, installed, plan, plan.describe(), r)


async def apply(
    ctx: UpdateContext,
    probation: Probation,
    target: str,
    progress: Progress,
    ignore_rollout: bool = False,
) -> Outcome:
    progress("checking", f"reading the manifest of {target}", 0, 0)
    found = await check(ctx, target, in_job=True, ignore_rollout=ignore_rollout)
    manifest, plan, installed = found.manifest, found.plan, found.check.installed_version
    name = found.check.model
    base, adapter = name.split(":", 1)
    pool = ctx.engine.pool(base)
    if plan is None:
        ctx.record(name, found.check.detail)
        current = _current(ctx, base, adapter)[:12]
        return Outcome(name, installed, installed, current, found.check.detail, 0,
                       manifest.size, False)  # fmt: skip
    store = ctx.engine.store
    try:
        file, fetched, how = await obtain(ctx, name, manifest, plan, progress)
        progress("installing", f"adding v{manifest.version} to the store", 0, 0)
        if file == store.blob(manifest.sha256):  # stored already (an older version)
            sha = await asyncio.to_thread(store.view(base).adopt, adapter, manifest.sha256)
        else:
            sha = await asyncio.to_thread(adapters.add, store, base, pool.spec.path, adapter, file)
            file.unlink(missing_ok=True)
        if sha != manifest.sha256:  # obtain checked it: a bug, or the file changed since
            raise FailedPrecondition(f"the stored file is {sha[:12]}, not {manifest.sha256[:12]}")
    except fetch.Aborted as e:
        raise ctx.aborted(name, e) from None
    except fetch.FetchError as e:
        ctx.record(name, f"download failed (will resume): {e}", level=logging.WARNING)
        raise Unavailable(
            f"update of {name!r}: download failed, it resumes next time: {e}"
        ) from None
    except SidecarError as e:  # not an adapter of this model, or not a GGUF
        ctx.fail(name, manifest.sha256, "validation", e.message)
        raise FailedPrecondition(f"update of {name!r} refused: {e.message}") from None
    previous = _current(ctx, base, adapter)
    # Measured before the flip, on live requests only: probation compares the new p99 to it.
    previous_p99 = probation.previous_p99(name, previous) if previous else None
    progress("swapping", f"proving v{manifest.version} before it serves", 0, 0)
    try:
        await adapter_swap.activate(pool, ctx.engine.adapters, adapter, sha, fresh=True)
    except SwapRefused as e:
        ctx.fail_refused(name, manifest.sha256, e)
        raise
    healthy_seconds = ctx.engine.config.update.healthy_seconds
    st = ctx.state(name)
    st.installed_version, st.installed_sha256 = manifest.version, sha
    st.probation = (
        probation_record(sha, manifest.version, previous, installed, healthy_seconds, previous_p99)
        if previous
        else {}
    )
    st.save(ctx.state_path(name))
    if previous:
        probation.begin(name)
    ctx.clean(name, keep={"state.json"})
    ctx.record(name, f"installed v{manifest.version} ({sha[:12]}) via {how}; fetched "
                     f"{fetched} bytes of {manifest.size}")  # fmt: skip
    if previous:
        progress("probation", f"v{manifest.version} serves; watching it for "
                 f"{healthy_seconds:.0f}s", 0, 0)  # fmt: skip
    return Outcome(name, installed, manifest.version, sha[:12], how, fetched, manifest.size, True)
