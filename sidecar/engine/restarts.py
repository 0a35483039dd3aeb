"""When a dead worker is started again: the restart policy, apart from the pool that applies it.

A death the running request explains (a crash signal, or a hang the supervisor killed) is
restarted at once: the request is refused from then on (see `poison`), so it cannot kill
the fresh worker too. Up to `BLAMED_FREE` such deaths per `BLAMED_WINDOW_S` restart at once;
past that, many different requests are killing workers (variants of one, callers without a
uid to ban) and restarts slow down like any crash loop.

Any other death waits a backoff that doubles while workers keep dying young (up to
`BACKOFF_MAX_S`) and falls back to `BACKOFF_START_S` once one has lived `HEALTHY_RESET_S`,
so a crash loop slows down but a rare crash restarts fast. A replacement that fails to
start waits longer each try.

Pure bookkeeping over a clock the caller passes in: no tasks, no slots, no I/O.
"""

from __future__ import annotations

from collections import deque

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
HEALTHY_RESET_S = 60.0
BLAMED_FREE = 3
BLAMED_WINDOW_S = 60.0


class RestartPolicy:
    """One model's restart schedule. `backoff_s` is the current backoff, for status."""

    def __init__(self) -> None:
        self.backoff_s = BACKOFF_START_S
        self._blamed: deque[float] = deque()  # when deaths blamed on requests happened

    def after_death(self, now: float, started_at: float, blamed: bool) -> float:
        """Seconds to wait before replacing a worker started at `started_at` that died at
        `now`; `blamed`: the request it ran explains the death."""
        if blamed:
            while self._blamed and self._blamed[0] < now - BLAMED_WINDOW_S:
                self._blamed.popleft()
            self._blamed.append(now)
            if len(self._blamed) <= BLAMED_FREE:
                return 0.0
        if now - started_at > HEALTHY_RESET_S:
            self.backoff_s = BACKOFF_START_S
        else:
            self.backoff_s = min(self.backoff_s * 2, BACKOFF_MAX_S)
        return self.backoff_s

    def after_failed_start(self, waited_s: float) -> float:
        """Seconds to wait before the next try, after a replacement that waited `waited_s`
        failed to start."""
        self.backoff_s = min(max(waited_s, BACKOFF_START_S) * 2, BACKOFF_MAX_S)
        return self.backoff_s
