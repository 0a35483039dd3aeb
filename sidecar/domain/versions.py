"""What the model store holds: one stored version of a named model, as listings show it."""

from __future__ import annotations

from dataclasses import dataclass

SHORT = 12  # the version prefix replies show


@dataclass(frozen=True)
class VersionInfo:
    name: str
    sha256: str
    size: int
    added: float
    active: bool
    previous: bool

    @property
    def short(self) -> str:
        return self.sha256[:SHORT]
