"""Cloud spending: cost from the usage the cloud reports, daily and monthly caps that
survive restarts (a small JSON file, written atomically after every charge).

Concurrent escalations must not overspend a cap: each call first reserves an upper bound
of its cost (`reserve`), which counts against the caps at once, and settles to the cost
the cloud reports when it is done (`settle`, also after a failure: a refused or failed
call costs what was reported, usually nothing). A call is let through while spent plus
reserved is under the cap, so the last call may still go over, as one call always could.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sidecar.fileio import write_atomic

log = logging.getLogger("sidecar.router")


@dataclass(eq=False)
class Reservation:
    """Money held for one call in flight."""

    amount: float
    day: str
    month: str
    settled: bool = False


@dataclass(frozen=True)
class Prices:
    prompt_per_mtok: float  # currency units per million prompt tokens
    completion_per_mtok: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.prompt_per_mtok + completion_tokens * self.completion_per_mtok
        ) / 1e6


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Budget:
    def __init__(
        self,
        path: Path,
        prices: Prices,
        daily_cap: float = 0.0,  # 0 = no cap
        monthly_cap: float = 0.0,
        clock: Callable[[], datetime] = _now,
        *,
        autosave: bool = True,  # False: the owner calls save() (off the event loop)
    ) -> None:
        self.path = path
        self.autosave = autosave
        self.prices = prices
        self.daily_cap = daily_cap
        self.monthly_cap = monthly_cap
        self._clock = clock
        self.day, self.month, self.spent_day, self.spent_month = "", "", 0.0, 0.0
        self.held: set[Reservation] = set()  # calls in flight
        self._load()

    def set_limits(self, prices: Prices, daily_cap: float, monthly_cap: float) -> None:
        """New prices and caps (a reload) from the next call on. What is spent today and
        this month, and the calls in flight, stay: a cap lowered below the spending
        refuses the next call, a raised one lets calls through again."""
        self.prices = prices
        self.daily_cap = daily_cap
        self.monthly_cap = monthly_cap

    def _load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
            self.day, self.month = str(raw["day"]), str(raw["month"])
            self.spent_day, self.spent_month = float(raw["spent_day"]), float(raw["spent_month"])
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as e:
            # Never forget spending silently: a damaged file counts as a spent budget for
            # the rest of the day and month (the log says why).
            log.error("budget file %s unreadable (%s): treating the caps as spent", self.path, e)
            self.day, self.month = self._keys()
            self.spent_day, self.spent_month = float("inf"), float("inf")

    def _keys(self) -> tuple[str, str]:
        now = self._clock()
        return now.strftime("%Y-%m-%d"), now.strftime("%Y-%m")

    def _roll(self) -> None:
        day, month = self._keys()
        if day != self.day:
            self.day, self.spent_day = day, 0.0
        if month != self.month:
            self.month, self.spent_month = month, 0.0

    def spent(self) -> str | None:
        """Which cap is used up ("daily", "monthly") by what is spent and held, or None."""
        self._roll()
        day = sum(r.amount for r in self.held if r.day == self.day)
        month = sum(r.amount for r in self.held if r.month == self.month)
        if self.daily_cap and self.spent_day + day >= self.daily_cap:
            return "daily"
        if self.monthly_cap and self.spent_month + month >= self.monthly_cap:
            return "monthly"
        return None

    def reserve(self, prompt_tokens: int, completion_tokens: int) -> Reservation | str:
        """Hold the cost of a call about to be made (token upper bounds); or the cap that
        is used up. Check and hold happen without yielding, so no other call slips in."""
        full = self.spent()
        if full is not None:
            return full
        r = Reservation(self.prices.cost(prompt_tokens, completion_tokens), self.day, self.month)
        # A call whose own worst case does not fit beside the calls in flight waits its turn
        # (refused now), so one huge request cannot hold the room every other call needs;
        # alone, it may go (the cap is then checked against what it really cost).
        if self.held and self._over(r.amount):
            return "daily" if self._over(r.amount, monthly=False) else "monthly"
        self.held.add(r)
        return r

    def _over(self, amount: float, *, monthly: bool = True) -> bool:
        day = sum(r.amount for r in self.held if r.day == self.day) + amount
        month = sum(r.amount for r in self.held if r.month == self.month) + amount
        if self.daily_cap and self.spent_day + day > self.daily_cap:
            return True
        return bool(monthly and self.monthly_cap and self.spent_month + month > self.monthly_cap)

    def settle(
        self, r: Reservation, prompt_tokens: int, completion_tokens: int, *, answered: int = 0
    ) -> float:
        """Release the hold and charge what the cloud reported (once). A server that answered
        but reported no usage is charged the reservation: a cap must hold without `usage`."""
        if r.settled:
            return 0.0
        r.settled = True
        self.held.discard(r)
        if prompt_tokens or completion_tokens:
            return self.charge(prompt_tokens, completion_tokens)
        return self._add(r.amount) if answered else 0.0

    def charge(self, prompt_tokens: int, completion_tokens: int) -> float:
        return self._add(self.prices.cost(prompt_tokens, completion_tokens))

    def _add(self, cost: float) -> float:
        self._roll()
        self.spent_day += cost
        self.spent_month += cost
        if self.autosave:
            self.save(self.state())
        return cost

    def state(self) -> bytes:
        """What save() writes: taken where the spending changes, written anywhere."""
        state = {"day": self.day, "month": self.month, "spent_day": self.spent_day,
                 "spent_month": self.spent_month}  # fmt: skip
        return json.dumps(state).encode()

    def save(self, state: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, state)
