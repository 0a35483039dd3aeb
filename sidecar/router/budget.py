"""Cloud spending: cost from the usage the cloud reports, daily and monthly caps that
survive restarts (a small JSON file, written atomically after every charge)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sidecar.store import write_atomic

log = logging.getLogger("sidecar.router")


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
    ) -> None:
        self.path = path
        self.prices = prices
        self.daily_cap = daily_cap
        self.monthly_cap = monthly_cap
        self._clock = clock
        self.day, self.month, self.spent_day, self.spent_month = "", "", 0.0, 0.0
        self._load()

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
        """Which cap is used up ("daily", "monthly"), or None."""
        self._roll()
        if self.daily_cap and self.spent_day >= self.daily_cap:
            return "daily"
        if self.monthly_cap and self.spent_month >= self.monthly_cap:
            return "monthly"
        return None

    def charge(self, prompt_tokens: int, completion_tokens: int) -> float:
        cost = self.prices.cost(prompt_tokens, completion_tokens)
        self._roll()
        self.spent_day += cost
        self.spent_month += cost
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {"day": self.day, "month": self.month, "spent_day": self.spent_day,
                 "spent_month": self.spent_month}  # fmt: skip
        write_atomic(self.path, json.dumps(state).encode())
        return cost
