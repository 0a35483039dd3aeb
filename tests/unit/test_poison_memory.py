"""Remembering requests that killed a worker: fingerprints, TTL, bounds, strikes."""

from __future__ import annotations

import signal

import pytest

from sidecar.domain.errors import InvalidRequest, KilledWorker
from sidecar.domain.types import (
    ChatMessage,
    ChatTask,
    EmbedTask,
    ExtractTask,
    GenerateTask,
    ModelRef,
)
from sidecar.engine import poison
from sidecar.engine.poison import Poison, crashed, fingerprint, principal
from sidecar.router.engine import failure_kind

MODEL = ModelRef("demo", "abc123")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_request_that_killed_a_worker_is_refused_until_its_ttl_passes() -> None:
    clock = Clock()
    p = Poison(clock)
    bad = ExtractTask("x", '{"type":"string","maxLength":30000}')
    p.check(bad, "uid:1/pid:2", MODEL)  # nothing known yet
    err = p.blame(bad, "uid:1/pid:2", MODEL, "crashed a worker of model 'demo' (pid 9, SIGSEGV)")
    assert isinstance(err, KilledWorker) and "not retried" in err.message
    with pytest.raises(KilledWorker, match=r"refused without running.*crashed a worker"):
        p.check(bad, "uid:7/pid:1", MODEL)  # identical: refused whoever sends it
    p.check(ExtractTask("x", '{"type":"string","maxLength":30}'), "uid:1/pid:2", MODEL)
    p.check(bad, "uid:1/pid:2", ModelRef("demo", "other"))  # another version may cope
    clock.now += poison.TTL_S + 1
    p.check(bad, "uid:1/pid:2", MODEL)


def test_the_fingerprint_covers_every_field_and_the_kind() -> None:
    a = GenerateTask("hi", 10)
    assert fingerprint(a, MODEL) == fingerprint(GenerateTask("hi", 10), MODEL)
    assert fingerprint(a, MODEL) != fingerprint(GenerateTask("hi", 11), MODEL)
    assert fingerprint(a, MODEL) != fingerprint(ChatTask((ChatMessage("user", "hi"),), 10), MODEL)
    assert fingerprint(EmbedTask(("\ud800",)), MODEL)  # a lone surrogate hashes too


def test_the_memory_is_bounded() -> None:
    p = Poison(Clock())
    for i in range(poison.MAX_REMEMBERED + 10):
        p.blame(GenerateTask(f"p{i}", 1), f"uid:{i}", MODEL, "crashed")
    assert len(p._requests) == poison.MAX_REMEMBERED
    assert len(p._strikes) <= poison.MAX_REMEMBERED
    p.check(GenerateTask("p0", 1), "uid:x", MODEL)  # the oldest was forgotten
    with pytest.raises(KilledWorker):
        p.check(GenerateTask(f"p{poison.MAX_REMEMBERED + 9}", 1), "uid:x", MODEL)


def test_a_principal_whose_distinct_requests_kill_workers_is_refused_for_a_while() -> None:
    clock = Clock()
    p = Poison(clock)
    for i in range(poison.STRIKES - 1):
        p.blame(GenerateTask(f"bad {i}", 1), f"uid:5/pid:{i}", MODEL, "crashed")
        clock.now += 1
    p.check(GenerateTask("fine", 1), "uid:5/pid:99", MODEL)
    p.blame(GenerateTask("bad last", 1), "uid:5/pid:100", MODEL, "crashed")
    # A new process of the same uid changes nothing; another uid is not affected.
    with pytest.raises(KilledWorker, match="uid:5 killed 3 workers"):
        p.check(GenerateTask("fine", 1), "uid:5/pid:101", MODEL)
    p.check(GenerateTask("fine", 1), "uid:6/pid:1", MODEL)
    clock.now += poison.BAN_S + 1
    p.check(GenerateTask("fine", 1), "uid:5/pid:101", MODEL)


def test_strikes_older_than_the_window_do_not_count() -> None:
    clock = Clock()
    p = Poison(clock)
    for i in range(poison.STRIKES + 2):
        p.blame(GenerateTask(f"bad {i}", 1), "uid:7/pid:1", MODEL, "crashed")
        clock.now += poison.STRIKE_WINDOW_S / (poison.STRIKES - 1) + 1
    p.check(GenerateTask("fine", 1), "uid:7/pid:1", MODEL)


def test_only_a_uid_the_kernel_vouches_for_is_ever_banned() -> None:
    """A shared bearer token or a self-chosen app name: banning it would let one client
    lock out every other one, or frame them. Those get refused by fingerprint only."""
    for caller in ("token:abc", "app:victim", "peer:unix:"):
        p = Poison(Clock())
        for i in range(poison.STRIKES + 1):
            p.blame(GenerateTask(f"bad {i}", 1), caller, MODEL, "crashed")
        p.check(GenerateTask("fine", 1), caller, MODEL)
        with pytest.raises(KilledWorker):
            p.check(GenerateTask("bad 0", 1), caller, MODEL)


def test_a_stall_is_not_a_strike() -> None:
    p = Poison(Clock())
    for i in range(poison.STRIKES + 1):
        p.blame(GenerateTask(f"slow {i}", 1), "uid:8/pid:1", MODEL, "stalled", strike=False)
    p.check(GenerateTask("fine", 1), "uid:8/pid:1", MODEL)


def test_principal_is_the_uid_or_nothing() -> None:
    assert principal("uid:1000/pid:42") == principal("uid:1000/app:x") == "uid:1000"
    assert principal("token:abcdef") is None and principal("app:x") is None


def test_only_deaths_from_inside_the_worker_are_crashes() -> None:
    assert crashed(-int(signal.SIGSEGV)) and crashed(-int(signal.SIGBUS)) and crashed(1)
    assert not crashed(-int(signal.SIGKILL))  # the OOM killer or an operator
    assert not crashed(-int(signal.SIGTERM)) and not crashed(0) and not crashed(None)


def test_a_refusal_is_the_callers_fault_and_never_escalated_to_the_cloud() -> None:
    err = Poison(Clock()).blame(GenerateTask("x", 1), "uid:1", MODEL, "crashed")
    assert isinstance(err, InvalidRequest)
    assert failure_kind(err) is None
