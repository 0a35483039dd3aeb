"""Prometheus metrics: what the daemon did, scraped over loopback HTTP or a Unix socket.

Off by default (`metrics.port`, `metrics.socket`). Each daemon has its own registry,
so tests and side-by-side daemons never share counters. Counters on the request path
are updated by the interceptor and the engine; gauges that describe state (queue depth,
workers, restarts) are read from the engine at scrape time, so they cannot drift.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import Collector

from sidecar.domain.types import Generation, Result
from sidecar.engine.local import PoolEngine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RATE_BUCKETS = (5, 10, 20, 30, 40, 60, 80, 100, 150, 200, 400)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["rpc", "model", "status", "tier"]
        self.requests = Counter(
            "sidecar_requests",
            "Requests by RPC, model, status and tier.",
            labels,
            registry=self.registry,
        )
        self.latency = Histogram(
            "sidecar_request_seconds",
            "Request latency, arrival to reply.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_token = Histogram(
            "sidecar_time_to_first_token_seconds",
            "Arrival to first token (or first result).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.update_rejections = Counter(
            "sidecar_update_rejections",
            "Updates refused: signature, expired, rollback, wrong_name, size, hash, "
            "malformed, too_large, validation, canary, unhealthy, fetch.",
            ["model", "reason"],
            registry=self.registry,
        )
        self.updates = Counter(
            "sidecar_updates",
            "Updates installed, by how they were fetched (delta or full).",
            ["model", "path"],
            registry=self.registry,
        )
        self.update_bytes = Counter(
            "sidecar_update_fetched_bytes",
            "Bytes downloaded for updates (manifests excluded).",
            ["model"],
            registry=self.registry,
        )
        self.decode_rate = Histogram(
            "sidecar_decode_tokens_per_second",
            "Generated tokens per second after the first token, per request.",
            ["model"],
            buckets=RATE_BUCKETS,
            registry=self.registry,
        )

        self.routed = Counter(
            "sidecar_routed",
            "Routed replies by who answered and the reason code (empty: kept local, no reason).",
            ["served_by", "reason"],
            registry=self.registry,
        )
        self.escalations = Counter(
            "sidecar_escalations",
            "Requests escalated to the cloud, by reason (low_confidence, local_unavailable, "
            "local_overloaded, local_timeout, local_context, local_schema, pre_route, cloud_only).",
            ["reason"],
            registry=self.registry,
        )
        self.spend = Counter(
            "sidecar_cloud_spend",
            "Estimated cloud spend (configured prices x reported usage).",
            registry=self.registry,
        )
        self.cloud_latency = Histogram(
            "sidecar_cloud_seconds",
            "Cloud answer time, retries included.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def route(self, result: Result, code: str) -> None:
        r = result.route
        self.routed.labels(r.served_by, code).inc()
        if r.served_by == "cloud":
            self.escalations.labels(code).inc()
            self.spend.inc(r.cost)
            self.cloud_latency.observe(r.cloud_latency_ms / 1000)

    def watch_router(self, router: RouterLike) -> None:
        self.registry.register(_RouterCollector(router))

    def request(
        self, rpc: str, model: str, status: str, seconds: float, tier: str = "local"
    ) -> None:
        self.requests.labels(rpc, model, status, tier).inc()
        self.latency.labels(rpc, model, status, tier).observe(seconds)

    def counts(self) -> dict[str, int]:
        """Requests by "<rpc>.<status>", summed over models and tiers (for `sidecar status`)."""
        out: dict[str, int] = {}
        for family in self.requests.collect():
            for s in family.samples:
                if s.name.endswith("_total"):
                    key = f"{s.labels['rpc']}.{s.labels['status']}"
                    out[key] = out.get(key, 0) + int(s.value)
        return out

    def result(self, result: Result) -> None:
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

    def watch(self, engine: PoolEngine) -> None:
        self.registry.register(_EngineCollector(engine))


class RouterLike(Protocol):
    @property
    def breaker_state(self) -> str: ...
    @property
    def breaker_opened(self) -> int: ...
    @property
    def spent(self) -> tuple[float, float]: ...


BREAKER = {"closed": 0.0, "half_open": 1.0, "open": 2.0}


class _RouterCollector(Collector):
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
        yield from (state, opened, spent)


class _EngineCollector(Collector):
    def __init__(self, engine: PoolEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "sidecar_queue_depth", "Requests waiting for a worker.", labels=["model"]
        )
        workers = GaugeMetricFamily(
            "sidecar_workers", "Workers by state.", labels=["model", "state"]
        )
        restarts = CounterMetricFamily(
            "sidecar_worker_restarts", "Workers replaced.", labels=["model"]
        )
        ready = GaugeMetricFamily(
            "sidecar_model_ready", "1 when the model has a live worker.", labels=["model"]
        )
        for status, _default in self.engine.status():
            name = status.model.name
            depth.add_metric([name], status.queue_depth)
            restarts.add_metric([name], status.restarts)
            ready.add_metric([name], 1.0 if status.ready else 0.0)
            states: dict[str, int] = {}
            for w in status.workers:
                states[w.state] = states.get(w.state, 0) + 1
            for state, n in states.items():
                workers.add_metric([name, state], n)
        yield from (depth, workers, restarts, ready)


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class MetricsServer:
    """Serves /metrics on loopback TCP or a Unix socket, in a background thread."""

    def __init__(
        self, registry: CollectorRegistry, host: str, port: int, unix: Path | None
    ) -> None:
        handler = MetricsHandler.factory(registry)
        self._server: Any
        if unix is not None:
            unix.unlink(missing_ok=True)
            self._server = _UnixHTTPServer(str(unix), _unix_handler(handler))
            unix.chmod(0o600)
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            server_cls = type(
                "_TCP",
                (socketserver.ThreadingMixIn, http.server.HTTPServer),
                {"address_family": family, "daemon_threads": True},
            )
            self._server = server_cls((host, port), handler)
        self.unix = unix
        self.port = None if unix is not None else int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self.unix is not None:
            with contextlib.suppress(FileNotFoundError):
                self.unix.unlink()


def _unix_handler(
    base: type[http.server.BaseHTTPRequestHandler],
) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(base):  # type: ignore[valid-type,misc]
        # BaseHTTPRequestHandler expects (host, port); a Unix peer has neither.
        def address_string(self) -> str:
            return "unix"

    return Handler
