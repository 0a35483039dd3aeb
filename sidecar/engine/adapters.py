"""Which LoRA adapter version a request's adapter name means, per base model.

The table mirrors the store's active adapter pointers in memory: requests resolve against
it on the event loop without touching the disk. It changes only where the store's pointers
do (an adapter added and canaried, activated, removed), after the pointer was written, so a
request sees either the old version or the new one, never none. A job fixes its version
at submit (`AdapterFile` in the task): an adapter swapped meanwhile does not change it.
"""

from __future__ import annotations

from sidecar.domain.errors import ModelNotFound
from sidecar.domain.names import shown
from sidecar.domain.types import AdaptableTask, AdapterFile
from sidecar.store import ModelStore


class AdapterTable:
    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self._active: dict[str, dict[str, AdapterFile]] = {}  # base -> adapter -> file

    def refresh(self) -> None:
        """Read every base model's active adapter versions from the store (blocking: a thread)."""
        table: dict[str, dict[str, AdapterFile]] = {}
        for space in self.store.spaces()[1:]:
            base = space.label.rstrip(":")
            for name in space.names():
                sha = space.active(name)
                if sha is not None:
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

    def get(self, base: str, name: str) -> AdapterFile | None:
        return self._active.get(base, {}).get(name)

    def names(self, base: str) -> list[str]:
        return sorted(self._active.get(base, {}))

    def resolve(self, base: str, name: str) -> AdapterFile:
        """The active version of `base`'s adapter `name`; ModelNotFound (NOT_FOUND) if it
        has none: a request for an adapter never runs on the bare model."""
        file = self.get(base, name)
        if file is None:
            known = ", ".join(self.names(base)) or "none"
            raise ModelNotFound(
                f"model {base!r} has no adapter named {shown(name)} (adapters: {known}); add "
                f"one with `sidecar models add --adapter-for {base} FILE --name NAME`"
            )
        return file

    def of(self, base: str, task: AdaptableTask) -> AdapterFile | None:
        """The file a task asks for (None: no adapter)."""
        return self.resolve(base, task.adapter) if task.adapter else None
