"""How many llama.cpp threads the next decode step may use: as many as there are idle cores.

llama.cpp's threads meet at a barrier several times per layer and spin while they wait, so a
decode step runs at the pace of its slowest thread. When one of them shares its core with
another busy process (an application's busy loop, or a sibling worker of the daemon), it is
descheduled for a whole time slice at every barrier and the step collapses: with 2 threads
on 2 cores beside one busy process, 0.7 tok/s instead of 40. One thread never collapses but
leaves an idle machine's other cores unused. So the governor measures, between decode steps,
how much CPU everything *except this process* used over the last ~100 ms, and lets the next
step use one thread per core that the others left mostly idle:

    free   = usable cores - cores busy with other processes      (over the last interval)
    threads = cores at least UP idle (adding one), or DOWN (keeping one), in 1..max_threads

A second thread pays only if its core is idle more than about half the time (while the
neighbour runs, both threads wait at the barrier), so the thresholds sit above one half,
with a gap between them so that measurement noise does not flap the count. Usable cores are
this process's CPU affinity, capped by a cgroup CPU quota when there is one (the quota's
cgroup's other processes count as busy too). Niced processes (nice > 0) do not count: the
scheduler gives their core to a thread of ours as soon as it wakes. Two workers busy at
once each see the other, and settle at one thread each instead of oversubscribing; when one
goes quiet the other takes both cores within an interval.

After a quiet spell (no decode step for a quarter of a second, or a window over a second)
the window's average says little about now, so the instantaneous count of runnable threads
on the machine (`procs_running`, minus this process's own) decides alone. A busy loop,
whether it started while the worker slept or ran all along, is runnable at every instant
and is seen before the first step, not after it has collapsed. A burst that ended before
the request came (the application that prepared it, another server) no longer keeps the
first steps, the prompt among them, on one thread (after a 1 s burst on both cores, a
14-token prompt's first token: 54 ms, against 90 ms when the window's average decided).

One instant can mislead the other way too: the daemon's own process is often still runnable
as it hands the request over, and llama.cpp's OpenMP threads (another server's, a sibling
worker's) spin for a few milliseconds after their last step before they sleep. So a thread
of another process caught runnable is looked at up to four more times, 2 ms apart, and
counts only if it is runnable every time, as a busy loop is. A neighbour that is busy only
part of the time may be asleep at those instants; the next measurement, an interval later,
sees it. The very first call, too soon after construction to measure anything, goes by that
count too.

Reading /proc/stat costs tens of microseconds; it happens at most once per interval, so
`threads()` can be called before every llama_decode. Where there is no /proc (not Linux),
the governor answers 1: the one choice that never collapses.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

UP = 0.8  # idle fraction of a core that earns one more thread
DOWN = 0.6  # idle fraction below which a core's thread is given back
INTERVAL = 0.1  # seconds between measurements
STALE = 1.0  # a window longer than this goes by the instantaneous runnable count
QUIET = 0.25  # and so does one after this long without a call (no decode step meanwhile)
SHORT = 0.05  # a window shorter than this (the first call) is all clock-tick noise
RECHECKS = 4  # further looks at the runnable count when others seem runnable at one instant
RECHECK_S = 0.002  # seconds between them

_PROC_STAT = Path("/proc/stat")
_CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Sample:
    """Cumulative counters at one moment (CPU-seconds), differenced over an interval."""

    t: float  # monotonic seconds
    busy: float  # all usable CPUs, busy (steal included: the hypervisor's is not ours)
    own: float  # this process, all its threads
    group: float | None = None  # the quota's cgroup, all its processes (None: no quota)
    running: int = 0  # runnable threads on the machine right now (procs_running)


@dataclass(frozen=True)
class Capacity:
    cpus: int  # usable CPUs (affinity)
    quota: float | None = None  # cores the cgroup may use (None: no quota)


def instant(dt: float) -> bool:
    """Whether a window of `dt` seconds needs the instantaneous runnable count: too long to
    say what is busy now, or too short to measure (/proc/stat counts 10 ms clock ticks)."""
    return dt > STALE or dt < SHORT


def free_cores(
    a: Sample, b: Sample, cap: Capacity, own_running: int = 0, now_only: bool = False
) -> float:
    """Cores other processes left idle between samples `a` and `b`. For a window that
    `instant` flags (too long to say what is busy now, or too short to measure), or with
    `now_only`, the runnable threads of others at `b` (`b.running` less this process's
    `own_running`) alone."""
    dt = b.t - a.t
    own = (b.own - a.own) / dt if dt > 0 else 0.0
    now_only = now_only or instant(dt)
    if now_only:
        others = float(max(0, b.running - own_running))
    else:
        others = max(0.0, (b.busy - a.busy) / dt - own)
    free = cap.cpus - others
    if cap.quota is not None:
        group_others = 0.0  # for an `instant` window, the machine-wide count covers the group's
        if a.group is not None and b.group is not None and not now_only:
            group_others = max(0.0, (b.group - a.group) / dt - own)
        free = min(free, cap.quota - group_others)
    return free


def decide(current: int, free: float, ceiling: int) -> int:
    """Threads for the next step: one more only for a core at least UP idle, one kept while
    its core is at least DOWN idle; never below 1 or above `ceiling`."""
    up = math.floor(free + 1 - UP)
    keep = math.floor(free + 1 - DOWN)
    want = up if up > current else min(current, keep)
    return max(1, min(ceiling, want))


# ------------------------------------------------------------------ reading Linux


def _read_stat(cpus: set[int], with_nice: bool = True) -> tuple[float, int]:
    """(busy CPU-seconds of `cpus` since boot, procs_running) from /proc/stat; without
    `with_nice`, the user time of niced processes (nice > 0) does not count as busy."""
    hz = os.sysconf("SC_CLK_TCK")
    busy = 0
    running = 0
    for line in _PROC_STAT.read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *fields = line.split()
            if int(name[3:]) in cpus:
                v = [int(x) for x in fields[:8]]
                # user nice system idle iowait irq softirq steal (guest is inside user)
                busy += v[0] + v[2] + v[5] + v[6] + v[7] + (v[1] if with_nice else 0)
        elif line.startswith("procs_running"):
            running = int(line.split()[1])
    return busy / hz, running


def own_running() -> int:
    """This process's threads that are runnable now (the caller among them)."""
    n = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2 : stat.rindex(")") + 3] == "R":
            n += 1
    return max(n, 1)


def _cgroup_dir(proc_cgroup: Path = Path("/proc/self/cgroup")) -> Path | None:
    for line in proc_cgroup.read_text().splitlines():
        if line.startswith("0::"):
            return _CGROUP_ROOT / line[3:].strip().lstrip("/")
    return None


def quota_group(proc_cgroup: Path = Path("/proc/self/cgroup")) -> tuple[Path, float] | None:
    """The cgroup (v2) whose CPU quota binds this process, and that quota in cores: the
    tightest cpu.max from its own cgroup up to the root; None without one."""
    try:
        d = _cgroup_dir(proc_cgroup)
    except OSError:
        return None
    best: tuple[Path, float] | None = None
    while d is not None and d.is_relative_to(_CGROUP_ROOT):
        try:
            q, period = (d / "cpu.max").read_text().split()[:2]
            if q != "max" and (best is None or int(q) / int(period) < best[1]):
                best = (d, int(q) / int(period))
        except (OSError, ValueError):
            pass
        d = d.parent if d != _CGROUP_ROOT else None
    return best


def _group_usage(d: Path) -> float | None:
    try:
        for line in (d / "cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec"):
                return int(line.split()[1]) / 1e6
    except (OSError, ValueError):
        pass
    return None


class Reader(Protocol):
    """Where the governor's numbers come from (Linux's /proc, or a test's fake)."""

    def capacity(self) -> Capacity: ...
    def sample(self) -> Sample: ...
    def runnable(self) -> int: ...
    def own_running(self) -> int: ...


class LinuxReader:
    """Samples and capacity from /proc and /sys/fs/cgroup."""

    def __init__(self) -> None:
        self._group = quota_group()
        # Niced processes (a background build, an indexer) yield their core to a thread of
        # ours, so they are not competition, unless this process is niced too.
        self._with_nice = os.getpriority(os.PRIO_PROCESS, 0) > 0

    def capacity(self) -> Capacity:
        cpus = len(os.sched_getaffinity(0))
        return Capacity(cpus, None if self._group is None else self._group[1])

    def sample(self) -> Sample:
        busy, running = _read_stat(os.sched_getaffinity(0), self._with_nice)
        group = None if self._group is None else _group_usage(self._group[0])
        return Sample(time.monotonic(), busy, time.process_time(), group, running)

    def runnable(self) -> int:
        return _read_stat(set(), self._with_nice)[1]

    def own_running(self) -> int:
        return own_running()


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_max_threads(configured: int) -> int:
    """The `threads` key as a thread count: 0 means every usable CPU (and the quota's
    cores, rounded up, when a cgroup caps them)."""
    if configured > 0:
        return configured
    n = usable_cpus()
    if _PROC_STAT.exists():
        group = quota_group()
        if group is not None:
            n = min(n, max(1, math.ceil(group[1])))
    return n


class CoreGovernor:
    """Threads for the next decode step, re-measured at most every `interval` seconds.

    Call `threads()` before each llama_decode and pass a changed answer to
    llama_set_n_threads. Cheap between measurements (a clock read)."""

    def __init__(
        self,
        max_threads: int,
        *,
        interval: float = INTERVAL,
        reader: Reader | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_threads = max(1, max_threads)
        self.interval = interval
        self._clock = clock
        self._reader: Reader | None = reader
        if reader is None and self.max_threads > 1 and _PROC_STAT.exists():
            try:
                self._reader = LinuxReader()
            except OSError:
                self._reader = None
        # Start with one thread: the first answer waits for a measurement, never guesses 2.
        self._current = 1
        self._last: Sample | None = None
        self._next_at = 0.0
        self._called = -math.inf  # when threads() was last called
        if self._reader is not None:
            self._last = self._safe_sample()
            self._next_at = self._clock()  # the first call measures whatever span elapsed

    def _safe_sample(self) -> Sample | None:
        assert self._reader is not None
        try:
            return self._reader.sample()
        except (OSError, ValueError):
            return None

    def threads(self) -> int:
        if self._reader is None:
            return 1
        now = self._clock()
        quiet, self._called = now - self._called > QUIET, now
        if now < self._next_at:
            return self._current
        self._next_at = now + self.interval
        b = self._safe_sample()
        a, self._last = self._last, b
        if a is None or b is None:
            self._current = 1
            return 1
        mine = 0
        now_only = quiet or instant(b.t - a.t)
        if now_only:
            mine = self._reader.own_running()
            b = self._settled(b, mine)
        cap = self._reader.capacity()
        free = free_cores(a, b, cap, mine, now_only)
        self._current = decide(self._current, free, min(self.max_threads, cap.cpus))
        return self._current

    def _settled(self, b: Sample, mine: int) -> Sample:
        """`b` with the fewest runnable threads seen over RECHECKS more looks, taken only
        while others still seem runnable: a thread busy for a moment drops out, a busy
        loop stays."""
        assert self._reader is not None
        running = b.running
        for _ in range(RECHECKS):
            if running <= mine:
                break
            time.sleep(RECHECK_S)
            try:
                running = min(running, self._reader.runnable())
            except (OSError, ValueError):
                break
        return replace(b, running=running)
