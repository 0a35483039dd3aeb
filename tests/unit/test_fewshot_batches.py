"""Embed jobs of a few-shot build are sized to the measured speed, so each stays short."""

from __future__ import annotations

from collections import deque

from sidecar.fewshot import pacing
from sidecar.fewshot.pacing import Pacer, take


def test_a_slow_machine_gets_small_jobs_and_a_fast_one_big_ones() -> None:
    slow, fast = Pacer(), Pacer()
    assert slow.budget() == pacing.START_BYTES
    for _ in range(20):
        slow.record(400, 10.0)  # 40 bytes/s: a loaded two-core VM
        fast.record(4000, 0.1)  # 40 kB/s
    assert slow.budget() == int(40 * pacing.TARGET_S)
    assert fast.budget() == pacing.MAX_BYTES


def test_a_job_takes_texts_within_the_budget_and_never_none() -> None:
    texts = ["x" * 100] * 40 + ["é" * 1000] + ["y"]
    pending = deque(range(len(texts)))
    assert take(pending, texts, 350) == [0, 1, 2]
    assert len(take(pending, texts, 10**6)) == pacing.MAX_TEXTS  # the count caps too
    assert take(pending, texts, 1) == [19]  # one text even over budget
    rest = []
    while pending:
        rest.append(take(pending, texts, 500))
    assert [40] in rest  # the long text went alone
    assert sorted(i for job in rest for i in job) == list(range(20, 42))
