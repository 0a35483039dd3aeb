"""The drop folder: a complete .gguf that appears in `store.drop` is added to the store
and (with `store.auto_swap`) swapped in. `drop/NAME/x.gguf` targets model NAME; a file
directly in `drop/` targets the default model. A LoRA adapter (its header says so) dropped
as `drop/NAME/ADAPTER.gguf` becomes a version of model NAME's adapter ADAPTER: checked
against the model, stored, and with `store.auto_swap` proven on a worker and made active.

The watchdog observer thread only signals; a consumer on the event loop debounces: a
file is taken once it has been quiet for `QUIET_S` and its size stopped changing, and
names that look temporary (dotfiles, *.partial, *.tmp, *.part, *.crdownload) are
ignored, so a copy in progress is never read as a model. A taken file leaves the
folder: into the store (consumed) or into quarantine (refused); with
`store.drop_remove_plaintext = false` it is kept instead, moved into `.imported/` or
`.refused/` inside the folder (dot-folders, which the watcher never reads), so it is never
taken twice.

One bad file must never stop the watching: whatever a file does (a symlink, a loop of
them, metadata that breaks the checker), it is refused with a reason and the consumer
goes on to the next. `health` says what the watcher is doing, or why it stopped, for
`sidecar status`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import time
import warnings
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from sidecar.domain.errors import SidecarError, SwapRefused
from sidecar.domain.names import name_problem
from sidecar.engine import adapters as adapter_swap
from sidecar.engine.local import PoolEngine
from sidecar.gguf_check import check as check_gguf
from sidecar.store import adapters

log = logging.getLogger("sidecar.drop")

QUIET_S = 1.0
TEMPORARY = (".partial", ".tmp", ".part", ".crdownload", "~")
KEEP_RESULTS = 100  # outcomes remembered for tests and status; older ones are dropped


# A folder made inside the watched tree while its parent is new (`.refused/NAME/` for a
# kept file) is added once by the recursive scan of the parent and once by its own create
# event; watchdog then replaces the callback with the same one and warns. Harmless, but
# under `-W error` the warning killed the observer thread, so nothing more was watched.
warnings.filterwarnings(
    "ignore", message="Callback with id .* already exists for watch", category=RuntimeWarning
)

KEPT = {True: ".imported", False: ".refused"}  # where a kept file goes, by outcome


def wanted(path: Path, folder: Path) -> bool:
    """A file the watcher takes: a .gguf under `folder` whose name is not temporary and
    that is not inside a dot-folder (a kept file's `.imported/`, or a writer's own)."""
    try:
        parts = path.relative_to(folder).parts
    except ValueError:
        return False
    return (
        path.suffix == ".gguf"
        and not any(p.startswith(".") for p in parts)
        and not path.name.endswith(TEMPORARY)
    )


def keep(folder: Path, path: Path, imported: bool) -> Path:
    """Move a taken file into `folder`'s `.imported/` (or `.refused/`) at its place
    relative to `folder`, under a free name (`x.gguf`, then `x.1.gguf`, ...); return where."""
    rel = path.relative_to(folder)
    target = folder / KEPT[imported] / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        dest = target if n == 0 else target.with_name(f"{target.stem}.{n}{target.suffix}")
        try:
            # A link fails on an existing name (no overwrite race); the folder's one filesystem.
            os.link(path, dest)
        except FileExistsError:
            n += 1
            continue
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            if dest.exists():  # no hard links here: a checked rename (we alone write here)
                n += 1
                continue
            path.rename(dest)
            return dest
        path.unlink()
        return dest


class _Signal(FileSystemEventHandler):
    def __init__(self, loop: asyncio.AbstractEventLoop, poke: asyncio.Queue[Path]) -> None:
        self.loop = loop
        self.poke = poke

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if raw:
                path = Path(raw if isinstance(raw, str) else raw.decode())
                self.loop.call_soon_threadsafe(self.poke.put_nowait, path)


class _Refused(Exception):
    """This dropped path is not taken; the message says why."""


class DropWatcher:
    def __init__(
        self, engine: PoolEngine, folder: Path, auto_swap: bool, remove_plaintext: bool = True
    ) -> None:
        self.engine = engine
        self.folder = folder
        self.auto_swap = auto_swap
        self.remove_plaintext = remove_plaintext  # False: taken files are kept (`keep`)
        self.results: list[str] = []  # what happened to each taken file, newest last
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped: str | None = None  # why watching stopped, once it has

    @property
    def health(self) -> str:
        """ "watching DIR" (with the last outcome), why the watcher stopped, or "" before it
        has started (a daemon still loading its models is not watching yet)."""
        if self._stopped is not None:
            return f"stopped: {self._stopped}"
        if self._observer is None:
            return ""
        if not self._observer.is_alive():
            return f"stopped: the observer of {self.folder} died (restart the daemon)"
        last = f"; last: {self.results[-1]}" if self.results else ""
        return f"watching {self.folder}{last}"

    async def start(self) -> None:
        pokes: asyncio.Queue[Path] = asyncio.Queue()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            observer = Observer()
            observer.schedule(
                _Signal(asyncio.get_running_loop(), pokes), str(self.folder), recursive=True
            )
            observer.start()
        except OSError as e:  # e.g. no permission, or out of inotify watches
            # The models still serve; the reason shows in status and the log.
            self._stopped = f"cannot watch {self.folder}: {e.strerror or e}"
            log.error("drop folder: %s", self._stopped)
            return
        self._observer = observer
        for existing in self.folder.rglob("*.gguf"):  # dropped while we were down
            pokes.put_nowait(existing)
        self._task = asyncio.create_task(self._consume(pokes))
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._stopping or task.cancelled():
            return
        error = task.exception()
        self._stopped = f"the consumer failed: {error!r}"  # a bug: _consume catches per file
        log.error("drop folder: %s", self._stopped, exc_info=error)

    async def close(self) -> None:
        self._stopping = True
        self._stopped = "the daemon is stopping"
        if self._task is not None:
            self._task.cancel()
            # Bounded: a swap in progress is left to finish on its own rather than block.
            await asyncio.wait({self._task}, timeout=10)
        if self._observer is not None:
            self._observer.stop()
            await asyncio.to_thread(self._observer.join, 5)

    async def _consume(self, pokes: asyncio.Queue[Path]) -> None:
        pending: dict[Path, tuple[float, int]] = {}  # path -> (last change, size then)
        while not self._stopping:
            # Plain sleep, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # races with its result, which would leave close() waiting forever.
            await asyncio.sleep(0.2)
            while not pokes.empty():
                path = pokes.get_nowait()
                if wanted(path, self.folder):
                    pending[path] = (time.monotonic(), -1)
            now = time.monotonic()
            for path, (changed, size) in list(pending.items()):
                try:
                    current = self._size(path)
                except FileNotFoundError:
                    del pending[path]  # renamed away or deleted before it settled
                    continue
                except Exception as e:  # _Refused, or a bug: this file only, never the loop
                    del pending[path]
                    if not isinstance(e, _Refused):
                        log.exception("drop folder: checking %r failed", path.name)
                    why = str(e) if isinstance(e, _Refused) else repr(e)
                    await self._refuse(path, why, self.remove_plaintext)
                    continue
                if current != size:
                    pending[path] = (now, current)
                elif now - changed >= QUIET_S:
                    del pending[path]
                    await self._take(path)

    def _size(self, path: Path) -> int:
        """The size of a dropped regular file; _Refused for anything else. Never follows a
        link: a symlink (or a loop of them) is refused as what it is."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise _Refused(f"cannot read it: {e.strerror or e}") from None
        if stat.S_ISLNK(st.st_mode):
            raise _Refused("it is a symbolic link: drop the file itself")
        if not stat.S_ISREG(st.st_mode):
            raise _Refused("it is not a regular file")
        return st.st_size

    def _target(self, path: Path) -> str:
        """The model a dropped file is for: its folder's name, or the default model."""
        rel = path.relative_to(self.folder)
        if len(rel.parts) == 1:
            return self.engine.default_model
        if len(rel.parts) > 2:
            raise _Refused("too deep: use DROP/x.gguf or DROP/NAME/x.gguf")
        problem = name_problem(rel.parts[0])
        if problem:
            raise _Refused(f"folder: {problem}")
        return rel.parts[0]

    def _set_aside(self, path: Path, reason: str, recorded: bool, remove: bool) -> str:
        """Quarantine a refused file (`recorded`: the store already kept the reason), or with
        `remove` False keep it in `.refused/`; what was done, for the outcome ("" = moved
        into quarantine as ever)."""
        if not (path.exists() or path.is_symlink()):
            return ""
        if remove or path.is_symlink():  # a link is never kept: it was never a file of ours
            self.engine.store.quarantine(path, reason)  # refused after it was stored too
            return ""
        kept = keep(self.folder, path, imported=False)
        if not recorded:  # the reason alone: the file is not the store's to copy
            self.engine.store.quarantine(kept, reason, move=False)
        return f" (kept as {kept.relative_to(self.folder)})"

    async def _refuse(self, path: Path, reason: str, remove: bool, recorded: bool = False) -> None:
        """`remove`: the setting as read once for this file (a reload may change it)."""
        outcome = f"{path.name!r}: refused: {reason}"
        try:
            outcome += await asyncio.to_thread(self._set_aside, path, reason, recorded, remove)
        except Exception as e:  # left in the folder; the watching goes on
            outcome += f" (could not set it aside: {e})"
        self._record(outcome, logging.WARNING)

    def _consumed(self, path: Path, remove: bool) -> str:
        """The store has `path`: remove it, or keep it in `.imported/` (said in the outcome)."""
        if remove:
            path.unlink(missing_ok=True)
            return ""
        if not path.exists():
            return ""
        return f" (kept as {keep(self.folder, path, imported=True).relative_to(self.folder)})"

    async def _take(self, path: Path) -> None:
        remove = self.remove_plaintext  # one reading per file: a reload may change it
        try:
            name = self._target(path)
            lora = await asyncio.to_thread(_adapter_name, path)
            if lora is not None:
                outcome = await self._take_adapter(path, name, lora)
            elif self.auto_swap:
                # Kept files stay where they are on refusal: the swap records the reason only.
                result = await self.engine.swap(name, path=path, move_source=remove)
                outcome = f"{path.name!r}: {name} now serves {result.new.version}"
                outcome += result.misfit_note()
            else:
                sha = await asyncio.to_thread(self.engine.store.add, path, name)
                outcome = f"{path.name!r}: added as {name}@{sha[:12]}"
            outcome += await asyncio.to_thread(self._consumed, path, remove)
        except _Refused as e:
            await self._refuse(path, str(e), remove)
        except SwapRefused as e:  # the store set its copy aside, or recorded why
            await self._refuse(path, e.message, remove, recorded=not remove)
        except SidecarError as e:
            await self._refuse(path, e.message, remove)
        except Exception as e:  # a bug somewhere below: this file is refused, watching goes on
            log.exception("drop folder: taking %r failed", path.name)
            await self._refuse(path, f"internal error: {e!r}", remove)
        else:
            self._record(outcome, logging.INFO)

    async def _take_adapter(self, path: Path, model: str, name: str) -> str:
        pool = self.engine.pool(model)
        base = pool.config.name
        sha = await asyncio.to_thread(
            adapters.add, self.engine.store, base, pool.spec.path, name, path
        )
        if not self.auto_swap:
            return f"{path.name!r}: added as {base}:{name}@{sha[:12]}"
        # A failed canary sets the stored copy aside; the dropped file goes too (`_refuse`).
        await adapter_swap.activate(pool, self.engine.adapters, name, sha, fresh=True)
        return f"{path.name!r}: {base}:{name} now serves {sha[:12]}"

    def _record(self, outcome: str, level: int) -> None:
        log.log(level, "drop folder: %s", outcome)
        self.results.append(outcome)
        del self.results[:-KEEP_RESULTS]


def _adapter_name(path: Path) -> str | None:
    """The adapter a dropped file is (its file name without .gguf), or None for a model."""
    if not adapters.is_adapter(check_gguf(path)):
        return None
    problem = name_problem(path.stem)
    if problem:
        raise _Refused(f"a LoRA adapter is named by its file: {problem}")
    return path.stem
