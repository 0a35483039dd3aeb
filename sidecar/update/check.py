"""Reading a model's origin: fetch and verify its signed manifest, then plan the cheapest
download from what the store holds (steps 1 and 2 of an update)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from sidecar.config import ModelConfig
from sidecar.domain.errors import FailedPrecondition, Unavailable
from sidecar.domain.updates import Check, Rollout
from sidecar.update import cohort, fetch
from sidecar.update.context import UpdateContext
from sidecar.update.manifest import Manifest, UpdateRejected, verify
from sidecar.update.plan import Plan, cheapest
from sidecar.update.state import Offered, State, aware_time
from sidecar.update.threads import in_thread

log = logging.getLogger("sidecar.update")

MANIFEST_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class Found:
    """A check as the apply sequence needs it: the figures a front end shows, the verified
    manifest, and the plan (None: nothing to do, see `check.detail`)."""

    check: Check
    manifest: Manifest
    plan: Plan | None


def _found(
    name: str,
    manifest: Manifest,
    installed: int,
    plan: Plan | None,
    detail: str,
    rollout: Rollout | None,
) -> Found:
    figures = Check(
        model=name,
        installed_version=installed,
        available_version=manifest.version,
        update_available=plan is not None,
        plan_text=plan.describe() if plan else "",
        download_bytes=plan.download_bytes if plan else 0,
        full_bytes=manifest.size,
        detail=detail,
        rollout=rollout,
    )
    return Found(figures, manifest, plan)


def _stale(st: State, manifest: Manifest) -> str:
    """Why `manifest` is an older copy of the newest version already read ("" if it is
    not). Re-publishing a version (to raise its rollout) leaves older copies in caches and
    CDNs for a while, so this is expected, not an attack: the daemon keeps acting on the
    newer copy, which also defeats a replay meant to hold the rollout back."""
    seen = aware_time(st.highest_created)  # State.load lets through none without a zone
    if manifest.version != st.highest_version or seen is None or manifest.created >= seen:
        return ""
    return (
        f"a copy of v{manifest.version} created {manifest.created.isoformat()}, before the "
        f"copy this daemon already read ({st.highest_created}): a stale cache, or a replay; "
        "acting on the newer copy"
    )


def _remember(ctx: UpdateContext, name: str, st: State, manifest: Manifest) -> None:
    """Keep the manifest as the newest read (verify and `_stale` let through none older):
    its version, when it was made, and its rollout, which status reports."""
    ctx.offered[name] = Offered(manifest.version, manifest.rollout)
    now = (manifest.version, manifest.created.isoformat(),
           {"version": manifest.version, "fraction": manifest.rollout})  # fmt: skip
    if (st.highest_version, st.highest_created, st.rollout) != now:
        st.highest_version, st.highest_created, st.rollout = now
        st.save(ctx.state_path(name))


async def read_manifest(
    ctx: UpdateContext, m: ModelConfig, name: str, *, in_job: bool
) -> tuple[Manifest, State, float]:
    """`name`'s manifest from `m`'s origin, verified with `m`'s key (a model's, or an
    adapter's MODEL:ADAPTER with its model's); its state, and the rollout fraction to act on
    (a stale copy's is the newer copy's)."""
    timeout = ctx.engine.config.update.timeout_seconds
    url = fetch.origin_url(m.update_origin, f"{name}.manifest.json")
    control = ctx.control(name, MANIFEST_MAX_BYTES, in_job=in_job)
    try:
        data = await in_thread(
            fetch.fetch_bytes, url, max_bytes=MANIFEST_MAX_BYTES, timeout=timeout, control=control
        )
    except UpdateRejected as e:
        ctx.reject(name, e.reason, e.message)
        raise FailedPrecondition(f"update of {name!r} refused: {e.message}") from None
    except fetch.Aborted as e:
        raise ctx.aborted(name, e) from None
    except fetch.FetchError as e:
        ctx.metrics.update_rejections.labels(name, "fetch").inc()
        ctx.record(name, f"origin unreachable: {e}", level=logging.WARNING)
        raise Unavailable(f"update origin for {name!r}: {e}") from None
    st = ctx.state(name)
    try:
        # A re-read of the version we already trust is fine; a lower version is a
        # rollback and is refused (an older copy of the same version: `_stale`).
        trusted = st.highest_version - 1 if st.highest_version else None
        manifest = verify(data, ctx.public_key(m), name=name, installed_version=trusted)
    except UpdateRejected as e:
        ctx.reject(name, e.reason, e.message)
        raise FailedPrecondition(f"update of {name!r} refused: {e.message}") from None
    fraction = manifest.rollout
    stale = _stale(st, manifest)
    if stale:
        # Its own reason, apart from `rollback`: every re-publish makes some, and they must
        # not set off the alarm meant for versions going down.
        ctx.metrics.update_rejections.labels(name, "stale").inc()
        log.warning("update %s: %s", name, stale)
        newer = st.offered()
        if newer is not None and newer.version == manifest.version:
            fraction = newer.fraction
    else:
        _remember(ctx, name, st, manifest)
    return manifest, st, fraction


async def check(
    ctx: UpdateContext, model: str, *, in_job: bool = False, ignore_rollout: bool = False
) -> Found:
    """`in_job`: part of an apply (a lone check must not take over its status).
    `ignore_rollout`: plan the update even when this daemon is outside its cohort (an
    operator's manual canary)."""
    m = ctx.model(model)
    name = m.name
    manifest, st, fraction = await read_manifest(ctx, m, name, in_job=in_job)
    me = await ctx.identity_now()
    r = cohort.rollout(me.value, name, manifest.version, fraction)
    current = ctx.engine.pool(name).ref.version  # sha256 prefix of what serves now
    installed = st.installed_version if st.installed_sha256.startswith(current) else 0
    installed = installed or next(
        (v for v, sha in manifest.versions.items() if sha.startswith(current)), 0
    )
    if manifest.sha256.startswith(current):
        return _found(name, manifest, installed, None, f"up to date (v{manifest.version})", r)
    if manifest.sha256 in st.failed:
        why = st.failed[manifest.sha256]
        return _found(name, manifest, installed, None,
                      f"v{manifest.version} failed before: {why}", r)  # fmt: skip
    # An operator's override of a download that was cut off carries over to its resume.
    resumed = st.pending == manifest.sha256 and st.pending_override
    if not r.in_cohort and not (ignore_rollout or resumed):
        return _found(name, manifest, installed, None, cohort.describe(r), r)
    plan = cheapest(manifest, await asyncio.to_thread(held, ctx), avoid=frozenset(st.bad_deltas))
    return _found(name, manifest, installed, plan, plan.describe(), r)


def held(ctx: UpdateContext) -> set[str]:
    """Full-file hashes a delta may start from: every stored version of any model or
    adapter (blocking: a thread)."""
    return {sha for s in ctx.engine.store.spaces() for n in s.names() for sha in s.versions(n)}
