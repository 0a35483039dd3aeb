"""Requests that killed a worker: remembered and refused, so one cannot keep a model down.

A worker that dies of a crash signal (SIGSEGV in llama.cpp, say) or that the supervisor
kills for going silent, while it runs a request, was killed by that request as far as
anyone can tell. The pool fails that request with `KilledWorker` (never retried on
another worker) and restarts the worker at once: backoff is for deaths nobody can
explain. To stop the same request killing the fresh worker, its fingerprint (kind,
model@version, a hash of the whole task) is remembered for `TTL_S` and an identical
request is refused before it reaches a worker. A caller whose distinct requests crashed
`STRIKES` workers within `STRIKE_WINDOW_S` is refused for `BAN_S`: "caller" here is the
uid the kernel reports on the Unix socket, not the process (a new process is cheap). Only
that identity is banned: a bearer token or an `x-sidecar-caller` name is shared by many
clients or chosen freely, so banning it would let one client lock out the others (or
frame them); those callers are refused by fingerprint only. A stall is not a strike
either: on a loaded machine a slow, legitimate request can go silent too. A death by
SIGKILL or SIGTERM that the daemon did not send (the kernel's OOM killer, an operator)
is not blamed on the request.
"""

from __future__ import annotations

import hashlib
import signal
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sidecar.domain.errors import KilledWorker
from sidecar.domain.types import ModelRef, Task

TTL_S = 600.0
MAX_REMEMBERED = 1024  # fingerprints (and principals) kept; the oldest go first
STRIKES = 3
STRIKE_WINDOW_S = 600.0
BAN_S = 600.0
V = TypeVar("V")

# Exit signals that come from inside the worker (its own code faulted), as opposed to
# SIGKILL/SIGTERM/SIGINT sent from outside.
CRASH_SIGNALS = frozenset(
    int(s)
    for s in (
        signal.SIGSEGV,
        signal.SIGBUS,
        signal.SIGABRT,
        signal.SIGILL,
        signal.SIGFPE,
        signal.SIGSYS,
        signal.SIGTRAP,
    )
)


def crashed(exitcode: int | None) -> bool:
    """Did the worker die of its own fault (a crash signal or a non-zero exit)?"""
    if exitcode is None:
        return False
    return exitcode > 0 or -exitcode in CRASH_SIGNALS


def how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            pass
    return f"exit code {exitcode}"


def fingerprint(task: Task, model: ModelRef) -> str:
    h = hashlib.sha256(f"{task.kind}\x00{model.name}@{model.version}\x00".encode())
    # repr of the frozen task dataclass covers every field, escaped (lone surrogates too).
    h.update(repr(task).encode("utf-8", "backslashreplace"))
    return h.hexdigest()


def principal(caller: str) -> str | None:
    """The identity the kernel vouches for (`uid:N`), or None when there is none."""
    who = caller.split("/", 1)[0]
    return who if who.startswith("uid:") else None


@dataclass(frozen=True)
class _Blame:
    at: float
    until: float
    why: str


class Poison:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._requests: OrderedDict[str, _Blame] = OrderedDict()
        self._strikes: OrderedDict[str, deque[float]] = OrderedDict()
        self._banned: OrderedDict[str, _Blame] = OrderedDict()

    def check(self, task: Task, caller: str, model: ModelRef) -> None:
        """Refuse a request that killed a worker before, or from a banned principal."""
        now = self._clock()
        who = principal(caller)
        ban = self._live(self._banned, who, now) if who is not None else None
        if ban is not None:
            raise KilledWorker(
                f"refused for {ban.until - now:.0f} more seconds: {ban.why}; "
                "fix the requests before sending more"
            )
        known = self._live(self._requests, fingerprint(task, model), now)
        if known is not None:
            raise KilledWorker(
                f"refused without running: an identical request {known.why} "
                f"{now - known.at:.0f}s ago, and stays refused for {known.until - now:.0f} "
                "more seconds: change the request (smaller input, schema or limits)"
            )

    def blame(
        self, task: Task, caller: str, model: ModelRef, what: str, *, strike: bool = True
    ) -> KilledWorker:
        """Remember a request that killed its worker; the error to fail it with.

        `what` completes "this request ...": "crashed a worker of model 'x' (pid 7, SIGSEGV)".
        `strike` counts it against the caller's uid (crashes, not stalls).
        """
        now = self._clock()
        _put(self._requests, fingerprint(task, model), _Blame(now, now + TTL_S, what))
        who = principal(caller)
        if strike and who is not None:
            self._strike(who, model, now)
        return KilledWorker(
            f"this request {what}; it is not retried, and an identical request is refused "
            f"for {TTL_S:.0f} seconds: change it (smaller input, schema or limits)"
        )

    def _strike(self, who: str, model: ModelRef, now: float) -> None:
        strikes = self._strikes.pop(who, deque())
        strikes.append(now)
        while strikes and strikes[0] < now - STRIKE_WINDOW_S:
            strikes.popleft()
        _put(self._strikes, who, strikes)
        if len(strikes) >= STRIKES:
            why = (
                f"requests from {who} killed {len(strikes)} workers of model {model.name!r} "
                f"in the last {STRIKE_WINDOW_S:.0f} seconds"
            )
            _put(self._banned, who, _Blame(now, now + BAN_S, why))
            strikes.clear()

    @staticmethod
    def _live(table: OrderedDict[str, _Blame], key: str, now: float) -> _Blame | None:
        entry = table.get(key)
        if entry is not None and entry.until <= now:
            del table[key]
            return None
        return entry


def _put(table: OrderedDict[str, V], key: str, value: V) -> None:
    table.pop(key, None)
    table[key] = value
    while len(table) > MAX_REMEMBERED:
        table.popitem(last=False)
