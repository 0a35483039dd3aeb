"""A bounded queue that serves callers round-robin, live work before background work.

One application sending a burst must not starve another: each caller has its own
FIFO, and `pop` takes one job from each caller in turn. The bound is on the total,
so a full queue refuses at once instead of letting latency grow without limit.

Background work (embedding the examples of a few-shot classifier, and a caller's
low-priority requests) waits in a second lane with its own bound: it runs only when no
live request waits, and however much of it is queued, it never takes a live request's place
or makes one RESOURCE_EXHAUSTED. A caller's low-priority requests (`request=True`) are also
bounded by `limit` on their own, so a bulk run gets RESOURCE_EXHAUSTED as a burst of live
requests would, and cannot fill the backstop that build work needs.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Generic, TypeVar

from sidecar.domain.errors import Overloaded

T = TypeVar("T")


class _Lane(Generic[T]):
    def __init__(self) -> None:
        self.callers: OrderedDict[str, deque[T]] = OrderedDict()
        self.size = 0

    def put(self, caller: str, item: T) -> None:
        self.callers.setdefault(caller, deque()).append(item)
        self.size += 1

    def pop(self) -> T | None:
        """The next job of the caller whose turn it is; that caller then goes to the back."""
        if not self.callers:
            return None
        caller, items = next(iter(self.callers.items()))
        item = items.popleft()
        self.size -= 1
        del self.callers[caller]
        if items:
            self.callers[caller] = items
        return item

    def remove(self, item: T) -> bool:
        for caller, items in self.callers.items():
            if item in items:
                items.remove(item)
                self.size -= 1
                if not items:
                    del self.callers[caller]
                return True
        return False


class FairQueue(Generic[T]):
    def __init__(self, limit: int, background_limit: int = 256) -> None:
        self.limit = limit
        # Background work is bounded where it is made (builds per caller, jobs per build);
        # this is a backstop, kept apart from `limit` so a small max_queue cannot starve it.
        self.background_limit = background_limit
        self._live: _Lane[T] = _Lane()
        self._background: _Lane[T] = _Lane()
        self._requests: set[int] = set()  # id() of the background items that are requests

    def __len__(self) -> int:
        return self._live.size + self._background.size

    @property
    def background(self) -> int:
        return self._background.size

    def put(self, caller: str, item: T, *, background: bool = False, request: bool = False) -> None:
        """Queue `item`; `request`: a background item that is a caller's low-priority request."""
        lane, limit = (
            (self._background, self.background_limit) if background else (self._live, self.limit)
        )
        if lane.size >= limit:
            what = "background jobs" if background else "requests"
            raise Overloaded(
                f"the queue for this model is full ({limit} {what} waiting): "
                "retry after a short backoff"
            )
        if background and request:
            if len(self._requests) >= self.limit:
                raise Overloaded(
                    f"the queue for this model is full ({self.limit} low-priority requests "
                    "waiting): retry after a short backoff"
                )
            self._requests.add(id(item))
        lane.put(caller, item)

    def pop(self, *, background: bool = True) -> T | None:
        """The next live job, else (if `background`) the next background job."""
        item = self._live.pop()
        if item is None and background:
            item = self._background.pop()
            self._requests.discard(id(item))
        return item

    def items(self) -> list[T]:
        return [
            i for lane in (self._live, self._background) for q in lane.callers.values() for i in q
        ]

    def remove(self, item: T) -> bool:
        if self._live.remove(item):
            return True
        self._requests.discard(id(item))
        return self._background.remove(item)

    @property
    def low_requests(self) -> int:
        return len(self._requests)
