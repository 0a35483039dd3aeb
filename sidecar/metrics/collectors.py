"""Gauges read from the parts at scrape time: what the daemon is, rather than what it did.

Each is computed from the part's own state when Prometheus asks, so none can drift from
what `sidecar status` and health report.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar.domain.admin import CloudReport, ShadowReport
from sidecar.domain.updates import Rollout
from sidecar.engine.local import PoolEngine


class BudgetLike(Protocol):
    daily_cap: float  # 0 = no cap
    monthly_cap: float


class RouterLike(Protocol):
    @property
    def breaker_state(self) -> str: ...
    @property
    def breaker_opened(self) -> int: ...
    @property
    def spent(self) -> tuple[float, float]: ...
    @property
    def budget(self) -> BudgetLike: ...
    def cloud_report(self) -> CloudReport: ...


class ReadinessLike(Protocol):
    def readiness(self) -> dict[str, bool]: ...


class RolloutsLike(Protocol):
    def rollouts(self) -> dict[str, Rollout]: ...


BREAKER = {"closed": 0.0, "half_open": 1.0, "open": 2.0}


class RouterCollector(Collector):
    def __init__(self, router: RouterLike) -> None:
        self.router = router

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "sidecar_cloud_breaker_state", "Cloud circuit breaker: 0 closed, 1 half-open, 2 open."
        )
        state.add_metric([], BREAKER[self.router.breaker_state])
        opened = CounterMetricFamily("sidecar_cloud_breaker_opens", "Times the breaker opened.")
        opened.add_metric([], self.router.breaker_opened)
        spent = GaugeMetricFamily(
            "sidecar_cloud_budget_spent", "Spent against the caps, by period.", labels=["period"]
        )
        day, month = self.router.spent
        spent.add_metric(["day"], day)
        spent.add_metric(["month"], month)
        cap = GaugeMetricFamily(
            "sidecar_cloud_budget_cap",
            "The caps (cloud.daily_cap, cloud.monthly_cap), by period; 0 = no cap.",
            labels=["period"],
        )
        budget = self.router.budget
        cap.add_metric(["day"], budget.daily_cap)
        cap.add_metric(["month"], budget.monthly_cap)
        yield from (state, opened, spent, cap)
        shadow = self.router.cloud_report().shadow
        if shadow is not None:
            yield from _shadow(shadow)


def _shadow(s: ShadowReport) -> Iterator[Metric]:
    """Shadow traffic: what became of the calls, what they cost, and the agreement."""
    calls = CounterMetricFamily(
        "sidecar_shadow_requests",
        "Shadow calls by result: sent (answered, compared), dropped (2 already in flight), "
        "capped (cloud.shadow_daily_cap spent), failed.",
        labels=["result"],
    )
    for result, n in sorted(s.counts.items()):
        calls.add_metric([result], n)
    spent = GaugeMetricFamily(
        "sidecar_shadow_spent", "Spent on shadow calls, by period.", labels=["period"]
    )
    spent.add_metric(["day"], s.spent_day)
    spent.add_metric(["month"], s.spent_month)
    labels = ["key", "model"]
    pairs = CounterMetricFamily(
        "sidecar_shadow_pairs", "Local answers compared with the cloud's.", labels=labels
    )
    agreed = CounterMetricFamily(
        "sidecar_shadow_agreements", "Compared answers that agreed.", labels=labels
    )
    rate = GaugeMetricFamily(
        "sidecar_shadow_agreement",
        "Agreement rate local vs cloud, with its Wilson 95% bounds.",
        labels=[*labels, "bound"],
    )
    for a in s.agreement:
        pairs.add_metric([a.key, a.model], a.total)
        agreed.add_metric([a.key, a.model], a.agreed)
        if a.total:
            rate.add_metric([a.key, a.model, "rate"], a.agreed / a.total)
        rate.add_metric([a.key, a.model, "low"], a.low)
        rate.add_metric([a.key, a.model, "high"], a.high)
    yield from (calls, spent, pairs, agreed, rate)


class EngineCollector(Collector):
    def __init__(self, engine: PoolEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "sidecar_queue_depth", "Requests waiting for a worker.", labels=["model"]
        )
        limit = GaugeMetricFamily(
            "sidecar_queue_limit",
            "Requests that may wait before more are refused (RESOURCE_EXHAUSTED).",
            labels=["model"],
        )
        workers = GaugeMetricFamily(
            "sidecar_workers", "Workers by state.", labels=["model", "state"]
        )
        restarts = CounterMetricFamily(
            "sidecar_worker_restarts", "Workers replaced.", labels=["model"]
        )
        ready = GaugeMetricFamily(
            "sidecar_model_ready",
            "1 when the model has a live worker, or is on demand and unloaded (it loads on use).",
            labels=["model"],
        )
        rss = GaugeMetricFamily(
            "sidecar_worker_rss_bytes",
            "Resident memory of the model's workers, summed (what could be read).",
            labels=["model"],
        )
        for status, _default in self.engine.status():
            name = status.model.name
            depth.add_metric([name], status.queue_depth)
            limit.add_metric([name], status.queue_limit)
            restarts.add_metric([name], status.restarts)
            ready.add_metric([name], 1.0 if status.ready else 0.0)
            rss.add_metric([name], sum(b for b in status.rss if b is not None))
            states: dict[str, int] = {}
            for w in status.workers:
                states[w.state] = states.get(w.state, 0) + 1
            for state, n in states.items():
                workers.add_metric([name, state], n)
        shedding = GaugeMetricFamily(
            "sidecar_shedding",
            "1 while new local requests are refused because system memory is low "
            "(server.min_available_mb).",
        )
        shedding.add_metric([], 1.0 if self.engine.shed_reason else 0.0)
        yield from (depth, limit, workers, restarts, ready, rss, shedding)


class ReadinessCollector(Collector):
    def __init__(self, supervisor: ReadinessLike) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        serving = GaugeMetricFamily(
            "sidecar_model_serving",
            "1 when health reports the model SERVING: a live worker and a passing readiness probe.",
            labels=["model"],
        )
        for name, ok in self.supervisor.readiness().items():
            serving.add_metric([name], 1.0 if ok else 0.0)
        yield serving


class RolloutCollector(Collector):
    """Where this daemon stands in each model's staged rollout (from the last manifest
    read): for the operator's own monitoring, as the daemon reports nothing upstream."""

    def __init__(self, updater: RolloutsLike) -> None:
        self.updater = updater

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        fraction = GaugeMetricFamily(
            "sidecar_update_rollout_fraction",
            "The share of daemons the origin's newest version is published to (manifest "
            "rollout, 0-1).",
            labels=labels,
        )
        position = GaugeMetricFamily(
            "sidecar_update_rollout_position",
            "This daemon's place in that version's rollout (0-1): it takes the version once "
            "the rollout is above it.",
            labels=labels,
        )
        cohort = GaugeMetricFamily(
            "sidecar_update_in_cohort",
            "1 when this daemon is in the cohort of the origin's newest version.",
            labels=labels,
        )
        for name, r in sorted(self.updater.rollouts().items()):
            at = [name, str(r.version)]
            fraction.add_metric(at, r.fraction)
            position.add_metric(at, r.position)
            cohort.add_metric(at, 1.0 if r.in_cohort else 0.0)
        yield from (fraction, position, cohort)
