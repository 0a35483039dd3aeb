"""What the privacy gate can detect, named: the config checks its keys against this, the
router's scanner builds its detectors from it. Bottom layer: no detection code here.

`cloud.sensitive` names built-in detectors; `cloud.sensitive_patterns` adds regexes, which
the scanner compiles exactly as `compile_pattern` does, so a pattern the config accepts is a
pattern the scanner runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# The built-in detectors, in the order the scanner runs them.
DETECTORS: tuple[str, ...] = ("email", "card", "iban", "phone")


def unknown_detectors(kinds: Iterable[str]) -> str | None:
    """The problem with a list of detector names, or None when every name is known."""
    unknown = set(kinds) - set(DETECTORS)
    if unknown:
        return f"unknown detector(s) {sorted(unknown)} (known: {', '.join(DETECTORS)})"
    return None


def compile_pattern(rx: str) -> re.Pattern[str]:
    """A custom pattern, compiled; ValueError (with the pattern named) when it is not one."""
    try:
        return re.compile(rx)
    except re.error as e:
        raise ValueError(f"custom pattern {rx!r} is not a valid regex: {e}") from None
