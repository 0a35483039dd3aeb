"""Prometheus metrics: what the daemon did, scraped over loopback HTTP or a Unix socket.

Off by default (`metrics.port`, `metrics.socket`). Each daemon has its own registry, so
tests and side-by-side daemons never share counters. Counters on the request path are
updated by hooks the composition root wires (`counters`); gauges that describe state
(queue depth, workers, restarts, readiness, budget) are read from the parts at scrape time
(`collectors`), so they cannot drift. Token counters carry a caller *class*, never the
caller's key (`calls`). `packaging/grafana/` and `packaging/prometheus/` hold a dashboard
and alerting rules over these series; a test checks every series they query exists.
"""

from sidecar.metrics.calls import CALLER_CLASSES, CallLabels, caller_class
from sidecar.metrics.counters import Metrics
from sidecar.metrics.server import MetricsServer

__all__ = ["CALLER_CLASSES", "CallLabels", "Metrics", "MetricsServer", "caller_class"]
