"""When a client tries a call again, and how long it waits first (pure: no I/O).

Only UNAVAILABLE (the daemon is not listening yet, loading, swapping, restarting a worker)
and RESOURCE_EXHAUSTED (a full queue, memory shedding) are retried: both say "not now",
and neither means the daemon did the work. Every other code is the same on a second try.
A stream is retried only until it has yielded its first message, so no message is ever
delivered twice.

The waits grow exponentially with jitter: before retry n (from 0) the client sleeps a
random time between half and all of `min(backoff_max_s, backoff_s * 2**n)`, so clients
that were refused together do not come back together, and each waits at least half the
nominal delay.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from grpc import StatusCode

RETRYABLE = frozenset({StatusCode.UNAVAILABLE, StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class Retry:
    """How a client retries: `retries` more attempts after the first (0 = never retry)."""

    retries: int = 0
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be 0 or more, not {self.retries}")
        if not self.backoff_s > 0 or not self.backoff_max_s >= self.backoff_s:
            raise ValueError(
                f"backoff_s must be > 0 and at most backoff_max_s "
                f"(got {self.backoff_s} and {self.backoff_max_s})"
            )

    def delay(self, attempt: int, code: StatusCode) -> float | None:
        """Seconds to wait before trying again after failed attempt number `attempt` (from
        0) ended with `code`; None: do not try again."""
        if code not in RETRYABLE or attempt >= self.retries:
            return None
        nominal = min(self.backoff_max_s, self.backoff_s * 2**attempt)
        return nominal * self.rng.uniform(0.5, 1.0)
