"""One log line and one metrics sample per request, whichever front end served it.

gRPC (the interceptor) and the OpenAI-compatible HTTP endpoint both end every request
here, so dashboards and `sidecar status` count them in one vocabulary: the status is
always a gRPC status code name, the `rpc` label names the method or HTTP route.
"""

from __future__ import annotations

import logging

from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.request")


class RequestLog:
    def __init__(self, metrics: Metrics, default_model: str, models: frozenset[str]) -> None:
        self.metrics = metrics
        self._default_model = default_model
        self._models = models

    def record(
        self,
        rid: str,
        method: str,
        rpc: str,
        model: str | None,
        status: str,
        seconds: float,
        **extra: object,
    ) -> None:
        """`model` is None for calls that take no model (health, Status), "" for the default."""
        label = model or (self._default_model if model is not None else "-")
        if model and model not in self._models:
            label = "unknown"  # a caller's typo must not mint a new time series
        self.metrics.request(rpc, label, status, seconds)
        ms = seconds * 1000
        fields: dict[str, object] = {
            "id": rid,
            "method": method,
            "model": model or "",
            "status": status,
        }
        fields |= {"ms": round(ms, 2), **extra}
        shown = "".join(f" {k}={v}" for k, v in extra.items())
        log.info(
            "%s %s model=%s status=%s%s ms=%.1f",
            rid,
            method,
            model or "-",
            status,
            shown,
            ms,
            extra={"request": fields},
        )
