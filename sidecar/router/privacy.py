"""What makes a request sensitive: personal data found in its text.

Detectors are regexes plus a checksum where one exists, so an order number that merely
looks like a card number does not block escalation: payment card numbers must pass the
Luhn check, IBANs the ISO 13616 mod-97 check. `redact` replaces the matched spans with a
placeholder naming the kind, for the optional redact-then-escalate mode.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
# 13-19 digits, optionally grouped by single spaces or dashes.
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
# International (+CC ...) or a national number with a leading 0 or grouped digits.
PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){2,4}(?!\w)"
)


def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    s = text.replace(" ", "").upper()
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    number = "".join(str(int(c, 36)) for c in moved)
    return int(number) % 97 == 1


def _card_ok(text: str) -> bool:
    digits = re.sub(r"[ -]", "", text)
    return 13 <= len(digits) <= 19 and luhn(digits)


def _phone_ok(text: str) -> bool:
    # Nine digits or an international prefix: an ISO date (8 digits) is not a phone number.
    digits = re.sub(r"\D", "", text)
    return (len(digits) >= 9 or text.startswith("+")) and len(digits) <= 15


@dataclass(frozen=True)
class Detector:
    kind: str
    pattern: re.Pattern[str]
    valid: Callable[[str], bool] = lambda _s: True


BUILTIN: dict[str, Detector] = {
    "email": Detector("email", EMAIL),
    "card": Detector("card", CARD, _card_ok),
    "iban": Detector("iban", IBAN, iban_ok),
    "phone": Detector("phone", PHONE, _phone_ok),
}


@dataclass(frozen=True)
class Match:
    kind: str
    start: int
    end: int


class Scanner:
    def __init__(self, kinds: Iterable[str] = BUILTIN, custom: Iterable[str] = ()) -> None:
        unknown = set(kinds) - set(BUILTIN)
        if unknown:
            raise ValueError(f"unknown detector(s) {sorted(unknown)} (known: {', '.join(BUILTIN)})")
        self.detectors = [BUILTIN[k] for k in kinds]
        for i, rx in enumerate(custom):
            try:
                self.detectors.append(Detector(f"custom{i}", re.compile(rx)))
            except re.error as e:
                raise ValueError(f"custom pattern {rx!r} is not a valid regex: {e}") from None

    def find(self, text: str) -> list[Match]:
        """Every sensitive span, earliest first; where spans overlap the earlier detector wins."""
        found: list[Match] = []
        for d in self.detectors:
            for m in d.pattern.finditer(text):
                if d.valid(m.group()) and not any(
                    m.start() < f.end and f.start < m.end() for f in found
                ):
                    found.append(Match(d.kind, m.start(), m.end()))
        return sorted(found, key=lambda m: m.start)

    def kinds(self, texts: Iterable[str]) -> list[str]:
        """The kinds of sensitive data in any of the texts, for the reply's reason."""
        return sorted({m.kind for t in texts for m in self.find(t)})


def redact(text: str, matches: list[Match]) -> str:
    out, pos = [], 0
    for m in sorted(matches, key=lambda m: m.start):
        out.append(text[pos : m.start])
        out.append(f"[{m.kind.upper()}]")
        pos = m.end
    out.append(text[pos:])
    return "".join(out)
