"""Recent request latencies per served version, bounded: what probation compares after an
update (the new version's p99 against the previous one's, measured before the flip).

The latency is a job's time on a worker (dispatch to reply), not its wait in the queue: a
queue that grew under a burst says nothing about the model, and the time on the worker is
what a slower model changes first. The daemon's own requests (probes, the eval gate) are
left out by the pool.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import numpy as np

WINDOW = 200  # the most recent requests kept per version
MIN_SAMPLES = 20  # fewer say too little about a p99 to roll anything back on
VERSIONS = 3  # versions kept: the serving one, the previous, one more in a quick swap back


class Latencies:
    def __init__(self, versions: int = VERSIONS) -> None:
        self._by_version: OrderedDict[str, deque[float]] = OrderedDict()
        self._versions = versions

    def add(self, version: str, ms: float) -> None:
        window = self._by_version.get(version)
        if window is None:
            window = self._by_version[version] = deque(maxlen=WINDOW)
            while len(self._by_version) > self._versions:
                self._by_version.popitem(last=False)
        self._by_version.move_to_end(version)
        window.append(ms)

    def samples(self, version: str) -> int:
        return len(self._by_version.get(version, ()))

    def p99(self, version: str) -> float | None:
        """The p99 in ms of `version`'s last requests; None below MIN_SAMPLES."""
        window = self._by_version.get(version)
        if window is None or len(window) < MIN_SAMPLES:
            return None
        return float(np.percentile(np.asarray(window, np.float64), 99))
