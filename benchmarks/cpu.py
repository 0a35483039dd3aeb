"""How much CPU other processes took while a benchmark ran: figures measured beside
foreign load are not comparable, so every report says how much there was."""

from __future__ import annotations

import os
import time
from contextlib import suppress

import psutil


def busy_cpu_s() -> float:
    """CPU seconds all CPUs have spent busy since boot."""
    c = psutil.cpu_times()
    return float(sum(c) - c.idle - getattr(c, "iowait", 0.0))


def tree_cpu_s(root: int | None = None) -> float:
    """CPU seconds used by `root` (this process by default) and all its descendants,
    living or reaped (reaped children are counted through their parent's children times)."""
    total = 0.0
    with suppress(psutil.Error):
        top = psutil.Process(root or os.getpid())
        for p in [top, *top.children(recursive=True)]:
            with suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
    return total


def busy_pct(seconds: float = 1.0) -> float:
    """Percent of all CPUs busy over the next `seconds`: the machine's background load."""
    return round(float(psutil.cpu_percent(interval=seconds)), 1)


class CpuMeter:
    """Cores used outside this benchmark's process tree, per named section."""

    def __init__(self) -> None:
        self.sections: dict[str, dict[str, float]] = {}
        self._name: str | None = None
        self._snap = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float]:
        return time.perf_counter(), busy_cpu_s(), tree_cpu_s()

    def mark(self, name: str | None) -> None:
        """End the current section (if any) and start `name` (None: just end it)."""
        snap = self._read()
        if self._name is not None:
            dt = max(snap[0] - self._snap[0], 1e-9)
            busy = (snap[1] - self._snap[1]) / dt
            ours = (snap[2] - self._snap[2]) / dt
            self.sections[self._name] = {
                "seconds": round(dt, 1),
                "all_cpu_cores_busy": round(busy, 2),
                "bench_tree_cores": round(ours, 2),
                "foreign_cores": round(max(0.0, busy - ours), 2),
            }
        self._name, self._snap = name, snap
