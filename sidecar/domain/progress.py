"""How a long operation (a swap, an update's fetch and install) reports where it is.

One shape for every operation, so a front end streams any of them the same way: a stage
name, a line of detail, and, for byte work, how much of how much is done.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, stage: str, detail: str = "", done: int = 0, total: int = 0) -> None: ...


def ignore(stage: str, detail: str = "", done: int = 0, total: int = 0) -> None:
    """A Progress for callers that do not watch."""
