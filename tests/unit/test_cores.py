"""The core governor: threads per decode step from measured CPU availability."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sidecar.worker import cores
from sidecar.worker.cores import Capacity, CoreGovernor, Sample, decide, free_cores

TWO = Capacity(cpus=2)


def window(busy: float, own: float, dt: float = 0.1, **kw: float) -> tuple[Sample, Sample]:
    """Two samples `dt` apart in which all CPUs were `busy` cores busy, this process `own`."""
    return Sample(0.0, 100.0, 10.0), Sample(dt, 100.0 + busy * dt, 10.0 + own * dt, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ decide


@pytest.mark.parametrize(
    ("current", "free", "ceiling", "expected"),
    [
        (1, 2.0, 2, 2),  # idle machine: both cores
        (2, 2.0, 2, 2),
        (1, 1.0, 2, 1),  # one busy neighbour: one core
        (2, 1.33, 2, 1),  # 2 threads beside a hog: the hog still shows 2/3 of a core
        (2, 1.0, 2, 1),  # a sibling worker busy on the other core
        (2, 1.65, 2, 2),  # hysteresis: a core 65% idle keeps its thread...
        (1, 1.65, 2, 1),  # ...but does not earn one
        (1, 1.85, 2, 2),
        (1, 8.0, 4, 4),  # never above the ceiling
        (3, -1.0, 4, 1),  # never below one
        (1, 3.9, 8, 4),
    ],
)
def test_decide_threads_from_free_cores(
    current: int, free: float, ceiling: int, expected: int
) -> None:
    assert decide(current, free, ceiling) == expected


# ------------------------------------------------------------------ free_cores


def test_an_idle_machine_running_only_us_is_all_free() -> None:
    a, b = window(busy=2.0, own=2.0)
    assert free_cores(a, b, TWO) == pytest.approx(2.0)


def test_other_processes_busy_time_is_not_free() -> None:
    a, b = window(busy=2.0, own=1.0)  # a sibling worker or a hog on the other core
    assert free_cores(a, b, TWO) == pytest.approx(1.0)


def test_own_spin_beyond_the_machine_total_never_makes_others_negative() -> None:
    a, b = window(busy=1.8, own=2.0)  # clock-tick rounding
    assert free_cores(a, b, TWO) == pytest.approx(2.0)


def test_a_cgroup_quota_caps_the_free_cores_and_its_other_processes_count() -> None:
    a = Sample(0.0, 0.0, 0.0, group=0.0)
    b = Sample(1.0, 0.5, 0.5, group=1.0)  # the machine is idle but the group's other half
    assert free_cores(a, b, Capacity(cpus=8, quota=1.5)) == pytest.approx(1.0)


def test_a_stale_window_goes_by_the_runnable_threads_of_others_now() -> None:
    # idle for 10 s on average, but a busy loop started just before this call
    a, b = Sample(0.0, 0.0, 0.0), Sample(10.0, 1.0, 0.0, running=2)
    assert free_cores(a, b, TWO, own_running=1) == pytest.approx(1.0)
    assert free_cores(a, b, TWO, own_running=2) == pytest.approx(2.0)


def test_a_burst_that_ended_while_the_worker_slept_leaves_both_cores_free() -> None:
    # another process kept both cores busy for most of the last 1.2 s, but nothing of
    # anyone else's is runnable now: the first steps (the prompt) may take both cores
    a, b = Sample(0.0, 0.0, 0.0), Sample(1.2, 2.3, 0.0, running=1)
    assert free_cores(a, b, TWO, own_running=1) == pytest.approx(2.0)
    # and within a cgroup quota, the group's past burst does not count either
    a, b = Sample(0.0, 0.0, 0.0, group=0.0), Sample(1.2, 2.3, 0.0, group=2.3, running=1)
    assert free_cores(a, b, Capacity(cpus=2, quota=2.0), own_running=1) == pytest.approx(2.0)


def test_a_window_too_short_to_measure_goes_by_the_runnable_count_alone() -> None:
    a, b = Sample(0.0, 0.0, 0.0), Sample(0.001, 1.0, 0.0, running=1)
    assert free_cores(a, b, TWO, own_running=1) == pytest.approx(2.0)


# ------------------------------------------------------------------ the governor over a toy machine


@dataclass
class Machine:
    """2 cores shared fairly by runnable threads: what each process gets per interval."""

    cpus: int = 2
    t: float = 0.0
    busy: float = 0.0
    hog: int = 0  # busy-looping threads of another application
    transient: int = 0  # threads of others runnable at the next look only (then asleep)
    procs: list[Proc] = field(default_factory=list)

    def advance(self, dt: float) -> None:
        threads = self.hog + sum(p.running for p in self.procs)
        share = min(1.0, self.cpus / threads) if threads else 0.0
        for p in self.procs:
            p.cpu += p.running * share * dt
        self.busy += min(threads, self.cpus) * dt
        self.t += dt


@dataclass(eq=False)
class Proc:
    machine: Machine
    running: int = 0  # threads decoding right now
    cpu: float = 0.0

    def capacity(self) -> Capacity:
        return Capacity(self.machine.cpus)

    def sample(self) -> Sample:
        m = self.machine
        return Sample(m.t, m.busy, self.cpu, running=self.running_now())

    def runnable(self) -> int:
        return self.running_now()

    def running_now(self) -> int:
        # the thread asking is runnable, whether or not this process is decoding
        m = self.machine
        others = sum(p.running for p in m.procs if p is not self)
        return m.hog + m.transient + others + max(1, self.running)

    def own_running(self) -> int:
        return max(1, self.running)


def decoding(m: Machine, govs: dict[Proc, CoreGovernor], steps: int) -> list[dict[Proc, int]]:
    """Each busy process asks its governor before every 10 ms step; the choices made."""
    seen = []
    for _ in range(steps):
        choice = {p: g.threads() for p, g in govs.items()}
        for p, n in choice.items():
            p.running = n
        m.advance(0.01)
        seen.append(choice)
    return seen


def governed(m: Machine, kind: type[Proc] = Proc) -> tuple[Proc, CoreGovernor]:
    """A worker process on `m` and its governor, reading the toy machine's clock."""
    p = kind(m)
    m.procs.append(p)
    return p, CoreGovernor(2, reader=p, clock=lambda: m.t)


def served_one_request(m: Machine, p: Proc, g: CoreGovernor) -> None:
    """The worker waits for, then decodes, a request of its own, and goes idle again."""
    m.advance(0.5)
    decoding(m, {p: g}, 30)
    p.running = 0


def test_one_stream_on_an_idle_machine_takes_both_cores() -> None:
    m = Machine()
    p, g = governed(m)
    m.advance(0.5)  # the worker waited for its first request
    seen = decoding(m, {p: g}, 50)
    assert all(s[p] == 2 for s in seen)


def test_beside_a_busy_loop_the_first_step_already_uses_one_thread() -> None:
    m = Machine(hog=1)
    p, g = governed(m)
    m.advance(0.5)
    seen = decoding(m, {p: g}, 50)
    assert all(s[p] == 1 for s in seen)


@pytest.mark.parametrize("burst", [0.4, 0.9, 1.5])
def test_after_a_neighbours_burst_ended_the_next_request_starts_on_both_cores(
    burst: float,
) -> None:
    m = Machine()
    p, g = governed(m)
    served_one_request(m, p, g)
    m.hog = 2  # then another server decodes on both cores while the worker waits
    m.advance(burst)
    m.hog = 0  # its burst ended just before our next request came
    seen = decoding(m, {p: g}, 50)
    assert all(s[p] == 2 for s in seen)


def test_a_busy_loop_that_ran_while_the_worker_waited_keeps_the_next_request_on_one_thread() -> (
    None
):
    m = Machine()
    p, g = governed(m)
    served_one_request(m, p, g)
    m.hog = 1
    m.advance(0.4)
    seen = decoding(m, {p: g}, 50)
    assert all(s[p] == 1 for s in seen)


class Transient(Proc):
    """A process at whose first look another thread is finishing a moment's work."""

    def sample(self) -> Sample:
        s = super().sample()
        self.machine.transient = 0  # gone by the next look
        return s


@pytest.mark.parametrize("hog", [0, 1])
def test_after_a_quiet_spell_a_thread_runnable_for_a_moment_is_not_a_busy_core(hog: int) -> None:
    # the daemon's own process handing the request over is runnable as the first step asks;
    # a busy loop is runnable at every look
    m = Machine(hog=hog)
    _, g = governed(m, Transient)
    m.advance(1.5)
    m.transient = 1
    assert g.threads() == 2 - hog


def test_a_busy_loop_that_starts_mid_stream_takes_one_thread_away_within_an_interval() -> None:
    m = Machine()
    p, g = governed(m)
    m.advance(0.5)
    decoding(m, {p: g}, 30)
    m.hog = 1
    seen = decoding(m, {p: g}, 50)
    assert [s[p] for s in seen[-30:]] == [1] * 30
    m.hog = 0
    seen = decoding(m, {p: g}, 50)
    assert [s[p] for s in seen[-30:]] == [2] * 30


def test_two_busy_sibling_workers_settle_at_one_thread_each_and_the_survivor_takes_both() -> None:
    m = Machine()
    a, b = Proc(m), Proc(m)
    m.procs += [a, b]
    ga = CoreGovernor(2, reader=a, clock=lambda: m.t)
    m.advance(0.5)
    decoding(m, {a: ga}, 30)  # a alone: both cores
    gb = CoreGovernor(2, reader=b, clock=lambda: m.t)
    seen = decoding(m, {a: ga, b: gb}, 60)
    assert all(s[a] == 1 and s[b] == 1 for s in seen[-40:])
    b.running = 0
    seen = decoding(m, {a: ga}, 30)
    assert [s[a] for s in seen[-15:]] == [2] * 15


def test_between_measurements_the_answer_is_the_last_one_without_reading() -> None:
    m = Machine()
    p = Proc(m)
    m.procs.append(p)
    reads = 0
    real = p.sample

    def counted() -> Sample:
        nonlocal reads
        reads += 1
        return real()

    p.sample = counted  # type: ignore[method-assign]
    g = CoreGovernor(2, reader=p, clock=lambda: m.t, interval=0.1)
    decoding(m, {p: g}, 100)  # one second of 10 ms steps
    assert reads <= 12


def test_a_ceiling_of_one_never_reads_proc() -> None:
    g = CoreGovernor(1)
    assert g._reader is None
    assert g.threads() == 1


def test_without_proc_the_governor_answers_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cores, "_PROC_STAT", Path("/nonexistent/stat"))
    assert CoreGovernor(8).threads() == 1


# ------------------------------------------------------------------ reading Linux (fake files)


def test_proc_stat_counts_busy_time_of_usable_cpus_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  999 0 999 999 0 0 0 0 0 0\n"
        "cpu0 100 1 20 500 7 2 3 4 50 0\n"
        "cpu1 200 0 0 500 0 0 0 0 0 0\n"
        "intr 1 2 3\n"
        "procs_running 3\n"
    )
    monkeypatch.setattr(cores, "_PROC_STAT", stat)
    hz = cores.os.sysconf("SC_CLK_TCK")
    assert cores._read_stat({0}) == (pytest.approx((100 + 1 + 20 + 2 + 3 + 4) / hz), 3)
    assert cores._read_stat({0, 1})[0] == pytest.approx(330 / hz)
    assert cores._read_stat({0}, with_nice=False)[0] == pytest.approx(129 / hz)


def test_the_tightest_cgroup_quota_up_the_tree_binds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "cg"
    leaf = root / "system.slice" / "sidecar.service"
    leaf.mkdir(parents=True)
    (root / "system.slice" / "cpu.max").write_text("150000 100000\n")
    (leaf / "cpu.max").write_text("max 100000\n")
    (root / "system.slice" / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 1\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/system.slice/sidecar.service\n")
    monkeypatch.setattr(cores, "_CGROUP_ROOT", root)
    group = cores.quota_group(proc)
    assert group == (root / "system.slice", 1.5)
    assert cores._group_usage(group[0]) == 2.5


def test_no_cgroup_quota_means_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cores, "_CGROUP_ROOT", tmp_path)
    proc = tmp_path / "cgroup"
    proc.write_text("0::/\n")
    assert cores.quota_group(proc) is None


# ------------------------------------------------------------------ for real


def test_on_this_machine_the_answer_is_between_one_and_the_ceiling() -> None:
    g = CoreGovernor(4, interval=0.0)
    for _ in range(5):
        assert 1 <= g.threads() <= 4


def test_threads_zero_means_every_usable_cpu() -> None:
    assert cores.resolve_max_threads(3) == 3
    assert 1 <= cores.resolve_max_threads(0) <= (cores.os.cpu_count() or 1)
