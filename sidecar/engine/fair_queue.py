"""A bounded queue that serves callers round-robin.

One application sending a burst must not starve another: each caller has its own
FIFO, and `pop` takes one job from each caller in turn. The bound is on the total,
so a full queue refuses at once instead of letting latency grow without limit.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Generic, TypeVar

from sidecar.errors import Overloaded

T = TypeVar("T")


class FairQueue(Generic[T]):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._callers: OrderedDict[str, deque[T]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def put(self, caller: str, item: T) -> None:
        if self._size >= self.limit:
            raise Overloaded(
                f"the queue for this model is full ({self.limit} waiting): retry after a short backoff"
            )
        self._callers.setdefault(caller, deque()).append(item)
        self._size += 1

    def pop(self) -> T | None:
        """The next job of the caller whose turn it is; that caller then goes to the back."""
        if not self._callers:
            return None
        caller, items = next(iter(self._callers.items()))
        item = items.popleft()
        self._size -= 1
        del self._callers[caller]
        if items:
            self._callers[caller] = items
        return item

    def items(self) -> list[T]:
        return [item for items in self._callers.values() for item in items]

    def remove(self, item: T) -> bool:
        for caller, items in self._callers.items():
            if item in items:
                items.remove(item)
                self._size -= 1
                if not items:
                    del self._callers[caller]
                return True
        return False
