"""The table every benchmark prints and the JSON file it writes."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import cpu_model


@dataclass(frozen=True)
class Col:
    """A column `width` characters wide, aligned `<` or `>`, after `gap` spaces."""

    width: int
    align: str = "<"
    gap: int = 0


class Table:
    """Fixed-width rows of text, with free lines (titles, notes) between them.

    Cells wider than their column push the rest of the row right rather than being cut:
    a benchmark's table must never hide a figure.
    """

    def __init__(self, *cols: Col) -> None:
        self.cols = cols
        self.lines: list[str] = []

    def row(self, *cells: object, tail: str = "") -> None:
        """One row; cells beyond the columns are an error, `tail` is appended as is."""
        if len(cells) > len(self.cols):
            raise ValueError(f"{len(cells)} cells for {len(self.cols)} columns")
        text = "".join(
            " " * c.gap + f"{cell!s:{c.align}{c.width}}"
            for cell, c in zip(cells, self.cols, strict=False)
        )
        self.lines.append((text + tail).rstrip())

    def rule(self) -> None:
        """A line of dashes under each column (one short, so columns stay apart)."""
        text = "".join(" " * c.gap + "-" * max(0, c.width - 1) + " " for c in self.cols)
        self.lines.append(text.rstrip())

    def line(self, text: str = "") -> None:
        self.lines.append(text)

    def render(self) -> str:
        return "\n".join(self.lines)


def write_json(path: Path, results: dict[str, Any], indent: int = 2) -> dict[str, Any]:
    """Write `results` with the CPU model and the time of the run, atomically (a run cut
    short never leaves half a file); returns what was written."""
    doc = {
        **results,
        "cpu_model": cpu_model(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(doc, indent=indent) + "\n")
    os.replace(partial, path)
    return doc
