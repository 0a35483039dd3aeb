"""The daemon's counters and histograms, and the hooks the composition root wires to them.

Label values come from small fixed sets (configured model names, status codes, reason
codes, caller classes), never from what a caller sends. Where a label's values are known
in advance, every series is created at zero when the parts are watched: a series that
first appears at 1 is invisible to `increase()` and `rate()`, so the first refused swap or
update would never fire an alert, and a dashboard would show "no data" instead of 0.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector

from sidecar.domain.types import Generation, Result
from sidecar.engine.local import PoolEngine
from sidecar.metrics import calls
from sidecar.metrics.collectors import (
    EngineCollector,
    ReadinessCollector,
    ReadinessLike,
    RolloutCollector,
    RolloutsLike,
    RouterCollector,
    RouterLike,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RATE_BUCKETS = (5, 10, 20, 30, 40, 60, 80, 100, 150, 200, 400)

ROUTES = ("local", "cloud")
# Escalation reason codes (router/policy.py): out_of_scope, low_confidence, local_<failure>
# for each way a local attempt fails (router/engine.py failure_kind), pre_route, cloud_only.
ESCALATION_REASONS = (
    "out_of_scope",
    "low_confidence",
    "local_unavailable",
    "local_overloaded",
    "local_timeout",
    "local_context",
    "local_schema",
    "pre_route",
    "cloud_only",
)
UPDATE_REJECTIONS = (
    "signature",
    "expired",
    "rollback",
    "wrong_name",
    "size",
    "hash",
    "malformed",
    "too_large",
    "validation",
    "canary",
    "eval",  # the eval gate refused the new version (engine/gate.py)
    "unhealthy",
    "fetch",
    "deadline",
    "stale",  # not refused: an older copy of the newest version (a cache), see update/check.py
)
UPDATE_PATHS = ("delta", "full")
# update/probation.py; requests_failed: an adapter version's requests failed (adapters
# only); rollback_failed: the swap back failed, the bad version still serves.
ROLLBACK_CAUSES = ("worker_died", "probe_failed", "latency", "requests_failed", "rollback_failed")
SWAP_OUTCOMES = (  # (outcome, stage): the stages engine/swap.py refuses at
    ("swapped", ""),
    ("unchanged", ""),
    ("refused", "validating"),
    ("refused", "memory"),
    ("refused", "loading"),
    ("refused", "canary"),
    ("refused", "eval"),
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # process_start_time_seconds: a daemon restarted (a crash, the systemd watchdog)
        # shows as a new start time; CPU, memory and open files beside it.
        ProcessCollector(registry=r)
        labels = ["rpc", "model", "status", "tier"]
        self.requests = Counter(
            "sidecar_requests", "Requests by RPC, model, status and tier.", labels, registry=r
        )
        self.latency = Histogram(
            "sidecar_request_seconds",
            "Request latency, arrival to reply.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "sidecar_time_to_first_token_seconds",
            "Arrival to first token (or first result).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_rate = Histogram(
            "sidecar_decode_tokens_per_second",
            "Generated tokens per second after the first token, per request.",
            ["model"],
            buckets=RATE_BUCKETS,
            registry=r,
        )
        token_labels = ["model", "route", "caller_class"]
        self.prompt_tokens = Counter(
            "sidecar_prompt_tokens",
            "Prompt tokens processed, by model, route (local: the workers, every local answer "
            "including ones then escalated; cloud: as the cloud reported) and caller class.",
            token_labels,
            registry=r,
        )
        self.completion_tokens = Counter(
            "sidecar_completion_tokens",
            "Completion tokens generated, by model, route and caller class.",
            token_labels,
            registry=r,
        )
        self.swaps = Counter(
            "sidecar_swaps",
            "Swaps by outcome (swapped, unchanged, refused) and the stage that refused.",
            ["model", "outcome", "stage"],
            registry=r,
        )
        self.update_rejections = Counter(
            "sidecar_update_rejections",
            "Updates refused or stopped, by reason: " + ", ".join(UPDATE_REJECTIONS) + ".",
            ["model", "reason"],
            registry=r,
        )
        self.updates = Counter(
            "sidecar_updates",
            "Updates installed, by how they were fetched (delta or full).",
            ["model", "path"],
            registry=r,
        )
        self.update_rollbacks = Counter(
            "sidecar_update_rollbacks",
            "New versions swapped back during probation, by cause: "
            + ", ".join(ROLLBACK_CAUSES)
            + " (the full reason: `sidecar status`, last rollback).",
            ["model", "cause"],
            registry=r,
        )
        self.update_bytes = Counter(
            "sidecar_update_fetched_bytes",
            "Bytes downloaded for updates (manifests excluded).",
            ["model"],
            registry=r,
        )
        self.routed = Counter(
            "sidecar_routed",
            "Routed replies by who answered and the reason code (empty: kept local, no "
            "reason; blocked: escalation was due but not allowed).",
            ["served_by", "reason"],
            registry=r,
        )
        self.escalations = Counter(
            "sidecar_escalations",
            "Requests escalated to the cloud, by reason: " + ", ".join(ESCALATION_REASONS) + ".",
            ["reason"],
            registry=r,
        )
        self.spend = Counter(
            "sidecar_cloud_spend",
            "Estimated cloud spend (configured prices x reported usage).",
            registry=r,
        )
        self.cloud_latency = Histogram(
            "sidecar_cloud_seconds",
            "Cloud answer time, retries included.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    # ------------------------------------------------------------ wiring (app.py)

    def watch(self, engine: PoolEngine) -> None:
        """Read the local engine's state at scrape time; create its models' series."""
        self.registry.register(EngineCollector(engine))
        self._models(engine.pools)

    def watch_router(self, router: RouterLike) -> None:
        self.registry.register(RouterCollector(router))
        for reason in ESCALATION_REASONS:
            self.escalations.labels(reason)
        for served_by, reason in (("local", ""), ("local", "blocked"), ("cloud", "")):
            self.routed.labels(served_by, reason)

    def watch_readiness(self, supervisor: ReadinessLike) -> None:
        """Readiness as health reports it (a live worker and a passing probe)."""
        self.registry.register(ReadinessCollector(supervisor))

    def watch_rollouts(self, updater: RolloutsLike) -> None:
        """Each model's staged rollout as the updater last read it."""
        self.registry.register(RolloutCollector(updater))

    def _models(self, names: Iterable[str]) -> None:
        for name in names:
            for route in ROUTES:
                for cls in calls.CALLER_CLASSES:
                    self.prompt_tokens.labels(name, route, cls)
                    self.completion_tokens.labels(name, route, cls)
            for outcome, stage in SWAP_OUTCOMES:
                self.swaps.labels(name, outcome, stage)
            for reason in UPDATE_REJECTIONS:
                self.update_rejections.labels(name, reason)
            for path in UPDATE_PATHS:
                self.updates.labels(name, path)
            for cause in ROLLBACK_CAUSES:
                self.update_rollbacks.labels(name, cause)
            self.update_bytes.labels(name)

    # ------------------------------------------------------------ hooks

    def request(
        self, rpc: str, model: str, status: str, seconds: float, tier: str = "local"
    ) -> None:
        """Every request, from either front end (`sidecar.calls.accounting`)."""
        self.requests.labels(rpc, model, status, tier).inc()
        self.latency.labels(rpc, model, status, tier).observe(seconds)

    def result(self, result: Result) -> None:
        """Every local answer (the pool's hook), escalated afterwards or not."""
        if result.model is None:
            return
        name = result.model.name
        t = result.timings
        self.first_token.labels(name).observe(t.first_token_ms / 1000)
        if isinstance(result, Generation) and result.usage.completion_tokens > 1:
            decode_s = (t.total_ms - t.first_token_ms) / 1000
            if decode_s > 0:
                self.decode_rate.labels(name).observe(
                    (result.usage.completion_tokens - 1) / decode_s
                )
        call = calls.current()
        self._tokens(result, name, "local", call.caller_class if call else calls.INTERNAL)

    def route(self, result: Result, code: str) -> None:
        """Every routed reply (the router's hook)."""
        r = result.route
        self.routed.labels(r.served_by, code).inc()
        if r.served_by == "cloud":
            self.escalations.labels(code).inc()
            self.spend.inc(r.cost)
            self.cloud_latency.observe(r.cloud_latency_ms / 1000)
            call = calls.current()
            if call is not None:  # the router only runs inside a call
                self._tokens(result, call.model, "cloud", call.caller_class)

    def swapped(self, model: str, outcome: str, stage: str) -> None:
        """Every swap that ran (the local engine's hook), whoever asked for it."""
        self.swaps.labels(model, outcome, stage).inc()

    def _tokens(self, result: Result, model: str, route: str, cls: str) -> None:
        if result.usage.prompt_tokens:
            self.prompt_tokens.labels(model, route, cls).inc(result.usage.prompt_tokens)
        if result.usage.completion_tokens:
            self.completion_tokens.labels(model, route, cls).inc(result.usage.completion_tokens)

    # ------------------------------------------------------------ reading back

    def counts(self) -> dict[str, int]:
        """Requests by "<rpc>.<status>", summed over models and tiers (for `sidecar status`)."""
        out: dict[str, int] = {}
        for family in self.requests.collect():
            for s in family.samples:
                if s.name.endswith("_total"):
                    key = f"{s.labels['rpc']}.{s.labels['status']}"
                    out[key] = out.get(key, 0) + int(s.value)
        return out
