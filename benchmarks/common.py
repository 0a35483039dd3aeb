"""Paths, log lines and the machine a benchmark ran on."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench-results"
# Where scripts/fetch_models.py puts models (never in the repository).
CACHE = Path(
    os.environ.get("SIDECAR_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sidecar"
)
MODELS = CACHE / "models"
SMOL = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = MODELS / "gemma-3-270m-q4_k_m.gguf"
# Outside the repository (CC-BY-4.0, see the docs); tests use the small copy in tests/data.
BANKING77 = ROOT.parent / "shared/data/banking77"


class Log:
    """`[tag HH:MM:SS] message` on stderr, so stdout carries only the table."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __call__(self, msg: str) -> None:
        print(f"[{self.tag} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's marketing name: figures only compare between runs on the same one."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
