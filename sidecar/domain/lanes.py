"""A caller's low-priority request, as the engines below the router see it.

PRIORITY_LOW work waits in a pool's background lane beside few-shot build work, and both
reach the pool as `background=True`. The pool must still tell them apart: a caller's
low-priority requests are bounded like live ones (`max_queue`, RESOURCE_EXHAUSTED beyond
it), not by the backstop meant for build jobs, and the router's local timeout starts when
a worker takes the request, not while it waits behind live traffic (a request that waited
would escalate to the cloud and cost money for a wait its caller asked for).

A context variable rather than one more `Engine.run` argument: the mark has to reach
every job a request makes (few-shot Classify runs an Embed and maybe label scoring), through
engine wrappers that should not have to know of it; a build a request starts clears it,
since the build's jobs are not the request's.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class LowPriority:
    """Set (by the router) while a caller's low-priority request runs."""

    on_dispatch: Callable[[], None] = _nothing  # a job of the request left the queue


LOW_PRIORITY: ContextVar[LowPriority | None] = ContextVar("sidecar_low_priority", default=None)
