"""Reading a model's origin: fetch and verify its signed manifest, then plan the cheapest
download from what the store holds (steps 1 and 2 of an update)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from sidecar.domain.errors import FailedPrecondition, Unavailable
from sidecar.domain.updates import Check
from sidecar.update import fetch
from sidecar.update.context import UpdateContext
from sidecar.update.manifest import Manifest, UpdateRejected, verify
from sidecar.update.plan import Plan, cheapest
from sidecar.update.threads import in_thread

MANIFEST_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class Found:
    """A check as the apply sequence needs it: the figures a front end shows, the verified
    manifest, and the plan (None: nothing to do, see `check.detail`)."""

    check: Check
    manifest: Manifest
    plan: Plan | None


def _found(name: str, manifest: Manifest, installed: int, plan: Plan | None, detail: str) -> Found:
    figures = Check(
        model=name,
        installed_version=installed,
        available_version=manifest.version,
        update_available=plan is not None,
        plan_text=plan.describe() if plan else "",
        download_bytes=plan.download_bytes if plan else 0,
        full_bytes=manifest.size,
        detail=detail,
    )
    return Found(figures, manifest, plan)


async def check(ctx: UpdateContext, model: str, *, in_job: bool = False) -> Found:
    """`in_job`: part of an apply (a lone check must not take over its status)."""
    m = ctx.model(model)
    name = m.name
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
        # A re-read of the version we already trust is fine; anything older is a
        # rollback (or a replayed old manifest) and is refused.
        trusted = st.highest_version - 1 if st.highest_version else None
        manifest = verify(data, ctx.public_key(m), name=name, installed_version=trusted)
    except UpdateRejected as e:
        ctx.reject(name, e.reason, e.message)
        raise FailedPrecondition(f"update of {name!r} refused: {e.message}") from None
    if manifest.version > st.highest_version:
        st.highest_version = manifest.version
        st.save(ctx.state_path(name))
    current = ctx.engine.pool(name).ref.version  # sha256 prefix of what serves now
    installed = st.installed_version if st.installed_sha256.startswith(current) else 0
    installed = installed or next(
        (v for v, sha in manifest.versions.items() if sha.startswith(current)), 0
    )
    if manifest.sha256.startswith(current):
        return _found(name, manifest, installed, None, f"up to date (v{manifest.version})")
    if manifest.sha256 in st.failed:
        why = st.failed[manifest.sha256]
        return _found(name, manifest, installed, None, f"v{manifest.version} failed before: {why}")
    held = await asyncio.to_thread(_held, ctx)
    plan = cheapest(manifest, held, avoid=frozenset(st.bad_deltas))
    return _found(name, manifest, installed, plan, plan.describe())


def _held(ctx: UpdateContext) -> set[str]:
    """Full-file hashes a delta may start from: every stored version of any model."""
    store = ctx.engine.store
    return {sha for n in store.names() for sha in store.versions(n)}
