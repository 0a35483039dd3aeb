"""The drop folder: a complete .gguf that appears in `store.drop` is added to the store
and (with `store.auto_swap`) swapped in. `drop/NAME/x.gguf` targets model NAME; a file
directly in `drop/` targets the default model.

The watchdog observer thread only signals; a consumer on the event loop debounces: a
file is taken once it has been quiet for `QUIET_S` and its size stopped changing, and
names that look temporary (dotfiles, *.partial, *.tmp, *.part, *.crdownload) are
ignored, so a copy in progress is never read as a model. A taken file leaves the
folder: into the store (consumed) or into quarantine (refused).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from sidecar.engine.engine import PoolEngine
from sidecar.errors import SidecarError

log = logging.getLogger("sidecar.drop")

QUIET_S = 1.0
TEMPORARY = (".partial", ".tmp", ".part", ".crdownload", "~")


def wanted(path: Path) -> bool:
    return (
        path.suffix == ".gguf"
        and not path.name.startswith(".")
        and not path.name.endswith(TEMPORARY)
    )


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


class DropWatcher:
    def __init__(self, engine: PoolEngine, folder: Path, auto_swap: bool) -> None:
        self.engine = engine
        self.folder = folder
        self.auto_swap = auto_swap
        self.results: list[str] = []  # what happened to each taken file, newest last
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        pokes: asyncio.Queue[Path] = asyncio.Queue()
        observer = Observer()
        observer.schedule(
            _Signal(asyncio.get_running_loop(), pokes), str(self.folder), recursive=True
        )
        observer.start()
        self._observer = observer
        for existing in self.folder.rglob("*.gguf"):  # dropped while we were down
            pokes.put_nowait(existing)
        self._task = asyncio.create_task(self._consume(pokes))

    async def close(self) -> None:
        self._stopping = True
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
                if wanted(path):
                    pending[path] = (time.monotonic(), -1)
            now = time.monotonic()
            for path, (changed, size) in list(pending.items()):
                try:
                    current = path.stat().st_size
                except FileNotFoundError:
                    del pending[path]  # renamed away or deleted before it settled
                    continue
                if current != size:
                    pending[path] = (now, current)
                elif now - changed >= QUIET_S:
                    del pending[path]
                    await self._take(path)

    def _set_aside(self, path: Path, reason: str) -> None:
        if path.exists():  # refused after it was stored (canary): move it aside too
            self.engine.store.quarantine(path, reason)

    async def _take(self, path: Path) -> None:
        name = path.parent.name if path.parent != self.folder else self.engine.default_model
        try:
            if self.auto_swap:
                result = await self.engine.swap(name, path=path, move_source=True)
                outcome = f"{path.name}: {name} now serves {result.new.version}"
            else:
                sha = await asyncio.to_thread(self.engine.store.add, path, name)
                outcome = f"{path.name}: added as {name}@{sha[:12]}"
            await asyncio.to_thread(path.unlink, missing_ok=True)  # consumed: the store has it
        except SidecarError as e:
            outcome = f"{path.name}: refused: {e.message}"
            await asyncio.to_thread(self._set_aside, path, e.message)
        log.info("drop folder: %s", outcome)
        self.results.append(outcome)
