"""Which LoRA adapter version a request's adapter name means, per base model.

The table mirrors the store's active adapter pointers in memory: requests resolve against
it on the event loop without touching the disk. It changes only where the store's pointers
do (an adapter added and canaried, activated, removed), after the pointer was written, so a
request sees either the old version or the new one, never none. A job fixes its version
at submit (`AdapterFile` in the task): an adapter swapped meanwhile does not change it.

It also knows which active adapters do not fit the file their model serves now (a swap of
the model to a file of other dimensions, checked by the swap before its flip and at start):
a request for one of those fails fast with the reason, never reaching a worker, until a
version that fits is added or activated.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

from sidecar.config import TaskConfig
from sidecar.domain.errors import (
    FailedPrecondition,
    InvalidRequest,
    ModelNotFound,
    SidecarError,
    SwapRefused,
)
from sidecar.domain.names import name_problem, shown
from sidecar.domain.specs import ADAPTERS_PER_WORKER
from sidecar.domain.status import SwapResult
from sidecar.domain.types import AdaptableTask, AdapterFile, ClassifyTask, GenerateTask, ModelRef
from sidecar.engine.gate import (
    ROW_TIMEOUT_S,
    Ask,
    Bars,
    ScoreCache,
    load_golden,
    score,
    through_queue,
    verdict,
)
from sidecar.engine.pool import PROBE_CALLER, VERSION_CHARS, Event, ModelPool
from sidecar.gguf_check import GGUFError, GGUFInfo
from sidecar.store import ModelStore
from sidecar.store.adapters import check_adapter

log = logging.getLogger("sidecar.adapters")


class AdapterTable:
    def __init__(
        self,
        store: ModelStore,
        tasks: Callable[[], tuple[TaskConfig, ...]] = tuple,
        default_model: str = "",
    ) -> None:
        self.store = store
        self.tasks = tasks  # the config's tasks, read per activation (the eval gate)
        self.default_model = default_model
        self._active: dict[str, dict[str, AdapterFile]] = {}  # base -> adapter -> file
        # base -> adapter -> why its active version does not fit the model's serving file
        self._misfit: dict[str, dict[str, str]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Called (in a thread) with a base model's name after its adapters changed: the
        # engine re-counts that model's memory footprint.
        self.changed: Callable[[str], None] = lambda _base: None

    def refresh(self) -> None:
        """Read every base model's active adapter versions from the store (blocking: a thread)."""
        table: dict[str, dict[str, AdapterFile]] = {}
        for space in self.store.spaces()[1:]:
            base = space.label.rstrip(":")
            for name in space.names():
                sha = space.active(name)
                if sha is None:
                    continue
                try:  # one stat each, unless a blob was touched since it was hashed
                    space.verify(sha)
                except SidecarError as e:  # set aside: requests for it are NOT_FOUND
                    log.warning("adapter %s:%s not served: %s", base, name, e.message)
                    continue
                table.setdefault(base, {})[name] = AdapterFile(name, sha, space.blob(sha))
        self._active = table

    def set(self, base: str, file: AdapterFile | None, name: str = "") -> None:
        """Point `base`'s adapter at `file` (None: `name` has no active version any more)."""
        current = dict(self._active.get(base, {}))
        if file is None:
            current.pop(name, None)
        else:
            current[file.name] = file
        self._active = {**self._active, base: current}
        # Whoever sets a version has checked it against the model (add, activate).
        misfit = dict(self._misfit.get(base, {}))
        misfit.pop(file.name if file is not None else name, None)
        self._misfit = {**self._misfit, base: misfit}

    def lock(self, base: str) -> asyncio.Lock:
        """Held by an activation of one of `base`'s adapters around its last fit check and
        its flip (never its canary), and by a swap of `base` around its adapters' check
        and its flip (never its loading, canary or drain): neither sees the other half done."""
        return self._locks.setdefault(base, asyncio.Lock())

    def fit(self, base: str, name: str, sha: str, model_file: Path) -> str:
        """Why version `sha` of `base`'s adapter `name` does not fit `model_file` ("" = it
        fits): the store's header check (`store.adapters.check_adapter`). Blocking: a thread."""
        try:
            model = self.store.gguf(model_file)
        except (GGUFError, OSError) as e:
            return f"cannot read the model file {model_file.name}: {e}"
        return self._why(base, name, sha, model)

    def _why(self, base: str, name: str, sha: str, model: GGUFInfo) -> str:
        where = Path(f"adapter {name!r} ({sha[:VERSION_CHARS]})")
        try:
            check_adapter(self.store.gguf(self.store.blob(sha)), model, base, where)
        except SidecarError as e:
            return e.message
        except OSError as e:
            return f"cannot read {where}: {e.strerror or e}"
        return ""

    def misfits(self, base: str, model_file: Path) -> dict[str, str]:
        """Each active adapter of `base` that does not fit `model_file` -> why; none when
        the model file's header cannot be read (the swap's validation refuses that file).
        Blocking (a header read per adapter): a thread."""
        try:
            model = self.store.gguf(model_file)
        except (GGUFError, OSError):
            return {}
        found = {}
        for name, file in self._active.get(base, {}).items():
            why = self._why(base, name, file.sha256, model)
            if why:
                found[name] = why
        return found

    def mark(self, base: str, misfits: dict[str, str], version: str) -> None:
        """`base` serves `version` now, which its adapters in `misfits` do not fit (all the
        others do). On the loop, at the flip: from then on requests for them fail fast."""
        for name, why in misfits.items():
            log.warning(
                "adapter %s:%s does not fit %s@%s, which now serves: %s; requests for it fail "
                "until a version made for this model is added",
                base, name, base, version, why,
            )  # fmt: skip
        self._misfit = {**self._misfit, base: dict(misfits)}

    def misfit(self, base: str, name: str) -> str:
        """Why `base`'s adapter `name` does not fit the model's serving file ("" = it fits)."""
        return self._misfit.get(base, {}).get(name, "")

    def get(self, base: str, name: str) -> AdapterFile | None:
        return self._active.get(base, {}).get(name)

    def shas(self, base: str) -> builtins.set[str]:
        """The versions `base`'s adapters serve now."""
        return {f.sha256 for f in self._active.get(base, {}).values()}

    def names(self, base: str, *, prefixed: bool = False) -> list[str]:
        """`base`'s adapters with an active version; `prefixed`: as "BASE:ADAPTER"."""
        names = sorted(self._active.get(base, {}))
        return [f"{base}:{n}" for n in names] if prefixed else names

    def loaded_bytes(self, base: str, workers: int) -> int:
        """What `base`'s adapters can take in its workers' memory: llama.cpp copies an
        adapter's tensors into its own buffers (no shared mapping), so each worker may hold
        its cache's worth, the largest active ones. Blocking (a header read each): a thread."""
        sizes = []
        for file in self._active.get(base, {}).values():
            with contextlib.suppress(OSError, SidecarError):  # gone or damaged: not loaded
                sizes.append(self.store.plain_size(file.path))  # a sealed blob is larger
        return sum(sorted(sizes, reverse=True)[:ADAPTERS_PER_WORKER]) * workers

    def resolve(self, base: str, name: str) -> AdapterFile:
        """The active version of `base`'s adapter `name`; ModelNotFound (NOT_FOUND) if it
        has none: a request for an adapter never runs on the bare model. A name no adapter
        can have (a path, a colon, a version suffix) is InvalidRequest: the caller's to fix."""
        problem = name_problem(name)
        if problem:
            raise InvalidRequest(f"adapter: {problem.replace('model name', 'adapter name')}")
        file = self.get(base, name)
        if file is None:
            known = ", ".join(self.names(base)) or "none"
            raise ModelNotFound(
                f"model {base!r} has no adapter named {shown(name)} (adapters: {known}); add "
                f"one with `sidecar models add --adapter-for {base} FILE --name NAME`"
            )
        error = self.misfit_error(base, name)
        if error is not None:
            raise error
        return file

    def misfit_error(self, base: str, name: str) -> FailedPrecondition | None:
        """What a request for `base`'s adapter `name` fails with while it does not fit the
        model's serving file (None: it fits)."""
        why = self.misfit(base, name)
        if not why:
            return None
        return FailedPrecondition(
            f"{why}; the adapter does not fit the file model {base!r} serves now (it was "
            f"swapped since): add a version made for this model with `sidecar models add "
            f"--adapter-for {base} FILE --name {name}`, or swap the model back"
        )

    def stranded(self, base: str, job_task: object) -> FailedPrecondition | None:
        """The error for a queued task that fixed a version of one of `base`'s adapters the
        table marks as not fitting the model's serving file (None: it may run)."""
        lora = getattr(job_task, "lora", None)
        if not isinstance(lora, AdapterFile):
            return None
        active = self.get(base, lora.name)
        if active is None or active.sha256 != lora.sha256:
            return None
        return self.misfit_error(base, lora.name)

    def of(self, base: str, task: AdaptableTask) -> AdapterFile | None:
        """The file a task asks for (None: no adapter)."""
        return self.resolve(base, task.adapter) if task.adapter else None


CANARY_PROMPT = "Hello"


async def prove(pool: ModelPool, file: AdapterFile) -> None:
    """The canary: a worker of the base model loads `file` and produces a token with it.
    Raises SwapRefused("canary", why) when it does not; the serving version is untouched."""
    task = GenerateTask(CANARY_PROMPT, 1, adapter=file.name, lora=file)
    job = pool.submit(task, PROBE_CALLER, stream=False)
    event = await job.events.get()
    if isinstance(event, SidecarError):
        raise SwapRefused("canary", f"adapter {file.name!r} did not run: {event.message}")


async def _fits(table: AdapterTable, base: str, name: str, sha: str, model_file: Path) -> None:
    """Refuse (at validating) version `sha` of `base`'s adapter `name` unless it fits
    `model_file`."""
    why = await asyncio.to_thread(table.fit, base, name, sha, model_file)
    if why:
        raise SwapRefused("validating", why)


async def activate(
    pool: ModelPool,
    table: AdapterTable,
    name: str,
    sha: str,
    *,
    fresh: bool = False,
    gate: bool = True,
) -> SwapResult:
    """Serve version `sha` of `pool`'s adapter `name`: verify the blob, prove it on a worker,
    then flip the store's pointer and the table. Requests already submitted keep the version
    they were given. A version that fails its canary is set aside (quarantined) when it was
    just added (`fresh`); the version serving before keeps serving either way. `gate` False
    skips the eval gate (probation's swap back to the version it replaced)."""
    started = time.monotonic()
    base = pool.config.name
    view = table.store.view(base)
    await asyncio.to_thread(view.verify, sha)
    old = table.get(base, name)
    file = AdapterFile(name, sha, view.blob(sha))
    refused: SwapRefused | None = None
    table.store.hold(sha)  # no gc between the canary and the pointer
    try:
        # Before the canary: a version made for another file of the model (one it
        # served before a swap) is refused with the header's reason, not llama.cpp's.
        checked = pool.spec.path
        await _fits(table, base, name, sha, checked)
        # Not under the lock: the canary may wait for an on-demand load, which waits for
        # a swap of the model, which waits for this lock.
        await prove(pool, file)
        if gate:
            await _gate(pool, table, file, old)
        async with table.lock(base):  # a swap of the model checks adapters and flips under it
            if pool.spec.path != checked:  # swapped meanwhile: checked against the new file
                await _fits(table, base, name, sha, pool.spec.path)
            await asyncio.to_thread(view.activate, name, sha)
            table.set(base, file)
        await asyncio.to_thread(table.changed, base)
    except SwapRefused as e:
        refused = e
    finally:
        table.store.release(sha)
    if refused is not None:
        if fresh:  # released first: a held version cannot be removed
            await asyncio.to_thread(_set_aside, view, name, sha, refused.reason)
        raise refused
    short = VERSION_CHARS
    log.info("adapter %s:%s@%s active", base, name, sha[:short])
    return SwapResult(
        old=ModelRef(f"{base}:{name}", old.sha256[:short] if old else ""),
        new=ModelRef(f"{base}:{name}", sha[:short]),
        strategy="adapter",
        seconds=time.monotonic() - started,
    )


async def _gate(
    pool: ModelPool, table: AdapterTable, file: AdapterFile, old: AdapterFile | None
) -> None:
    """The eval gate, where configured: a config task with this `adapter` (of this model)
    and an `eval_file`. The candidate answers the golden set through the model's queue as
    background work (an adapter is chosen per request: no workers of its own), and is
    refused (SwapRefused "eval") below the model's eval_min_accuracy, or more than its
    eval_max_regression below the serving adapter version's score (cached per version)."""
    base = pool.config.name
    task = next(
        (
            t
            for t in table.tasks()
            if t.adapter == file.name
            and t.eval_file  # "" (built, not loaded) is unset too
            and (t.model or table.default_model) == base
        ),
        None,
    )
    if task is None:
        return
    golden = await asyncio.to_thread(load_golden, task)
    cache = ScoreCache(table.store.root / "eval" / f"{base}:{file.name}" / "scores.json")

    def lanes(lora: AdapterFile) -> list[Ask]:
        def ask(t: ClassifyTask) -> Awaitable[Event]:
            return through_queue(pool, replace(t, adapter=lora.name, lora=lora))

        return [ask] * max(1, sum(s.capacity for s in pool.workers()))

    serving = None
    try:
        if old is not None:
            serving = await asyncio.to_thread(cache.get, old.sha256, golden.digest)
            if serving is None:
                serving, _ = await score(golden, lanes(old), "serving adapter")
                await asyncio.to_thread(cache.put, old.sha256, golden.digest, serving, task.name)
        candidate, _ = await score(golden, lanes(file), "candidate adapter")
    except TimeoutError:
        raise SwapRefused(
            "eval", f"a golden row got no answer within {ROW_TIMEOUT_S:.0f}s"
        ) from None
    await asyncio.to_thread(cache.put, file.sha256, golden.digest, candidate, task.name)
    problem = verdict(candidate, serving, Bars.of(pool.config))
    text = f"adapter {file.name!r} scored {candidate.shown()} on {task.name!r}" + (
        f", the serving version {serving.shown()}" if serving is not None else ""
    )
    if problem is not None:
        raise SwapRefused("eval", f"{text}: {problem}")
    log.info("eval gate passed: %s", text)


def _set_aside(view: ModelStore, name: str, sha: str, reason: str) -> None:
    view.quarantine(view.blob(sha), reason, move=False)
    with contextlib.suppress(SidecarError):
        view.remove(name, sha, {})
