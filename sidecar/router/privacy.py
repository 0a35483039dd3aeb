"""What makes text sensitive: personal data found in it, however it is written.

People (and attackers) write a card number with dots, non-breaking spaces or zero-width
characters between the digits, an e-mail with a full-width at sign (U+FF20) or
percent-encoded, an IBAN in lower case. So detectors never read the caller's text
directly: `normalise` folds it first (Unicode NFKC, format and combining characters
dropped, every dash a `-`, every space a ` `, `%XX` escapes decoded) and keeps a map
back to the original offsets, so `redact` removes exactly what the caller wrote,
obfuscation included.

Checksums keep look-alikes out: a card must pass Luhn and start like a card (2-6), an
IBAN the ISO 13616 mod-97 check for its country's length, a phone number must be a
valid number for the `phonenumbers` metadata (a maintained copy of Google's
libphonenumber) in the international form or one of the common national forms.
Detection is anchored (on `@`, on digit runs), so its cost is linear in the text.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import phonenumbers

from sidecar.domain.detectors import DETECTORS, compile_pattern, unknown_detectors

# ------------------------------------------------------------------ normalisation

# Invisible characters outside the Cf (format) category that still hide a separator.
_INVISIBLE = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u3164\uffa0")
_DOTS = frozenset("\u3002\uff61")  # ideographic full stops: IDNA reads them as dots
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_SPECIAL = re.compile(r"(?:%[0-9A-Fa-f]{2})+|[^\x00-\x7f]+")


@lru_cache(maxsize=8192)
def _fold(c: str) -> str:
    cat = unicodedata.category(c)
    if cat in ("Cf", "Mn", "Me") or c in _INVISIBLE or 0xFE00 <= ord(c) <= 0xFE0F:
        return ""
    if cat == "Pd" or c == "\u2212":
        return "-"
    if cat == "Zs":
        return " "
    if cat in ("Zl", "Zp"):
        return "\n"
    if c in _DOTS:
        return "."
    if cat == "Nd":  # Arabic-Indic, Devanagari, ... digits: a cloud model reads them fine
        return str(unicodedata.digit(c))
    folded = unicodedata.normalize("NFKC", c)
    if folded.isascii():
        return folded
    return "".join(_fold(x) if x != c else x for x in folded)


def _percent(run: str) -> str:
    try:
        decoded = bytes.fromhex(run.replace("%", "")).decode("utf-8")
    except UnicodeDecodeError:
        return run
    return "".join(x if x.isascii() else _fold(x) for x in decoded)


@dataclass(frozen=True)
class Normalised:
    """Folded text plus, per piece, where it came from: a linear piece maps char for
    char; a folded one (an escape, a full-width letter) maps as a whole."""

    text: str
    starts: tuple[int, ...]  # where each piece starts in `text`
    origins: tuple[tuple[int, int, bool], ...]  # (start, end, linear) in the original

    def span(self, a: int, b: int) -> tuple[int, int]:
        """The original span of text[a:b] (b > a)."""
        return self._at(a)[0], self._at(b - 1)[1]

    def _at(self, i: int) -> tuple[int, int]:
        k = bisect_right(self.starts, i) - 1
        start, end, linear = self.origins[k]
        if linear:
            o = start + i - self.starts[k]
            return o, o + 1
        return start, end


def normalise(text: str) -> Normalised:
    whole = (0,), ((0, len(text), True),)
    if text.isascii() and "%" not in text:  # the common case costs nothing
        return Normalised(text, *whole)
    table = {ord(c): _fold(c) for c in set(text) if ord(c) > 127}
    if all(len(f) == 1 for f in table.values()) and not _PERCENT.search(text):
        # Every character folds to one (spaces, dashes, full-width forms): same offsets.
        return Normalised(text.translate(table), *whole)
    out: list[str] = []
    starts: list[int] = []
    origins: list[tuple[int, int, bool]] = []
    n = pos = 0

    def piece(s: str, start: int, end: int, linear: bool) -> None:
        nonlocal n
        out.append(s)
        starts.append(n)
        origins.append((start, end, linear))
        n += len(s)

    for m in _SPECIAL.finditer(text):
        if m.start() > pos:
            piece(text[pos : m.start()], pos, m.start(), True)
        s = m.group()
        if s[0] == "%":
            folded = _percent(s)
            if folded:
                piece(folded, m.start(), m.end(), folded == s)
        else:
            chars = [_fold(c) for c in s]
            if all(f == c for f, c in zip(chars, s, strict=True)):  # e.g. a word in another script
                piece(s, m.start(), m.end(), True)
            else:
                for i, f in enumerate(chars):
                    if f:
                        piece(f, m.start() + i, m.start() + i + 1, f == s[i])
        pos = m.end()
    if pos < len(text) or not out:
        piece(text[pos:], pos, len(text), True)
    return Normalised("".join(out), tuple(starts), tuple(origins))


# ------------------------------------------------------------------ cards


def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# Digit groups joined by short separator runs (`4111 - 1111`, `4111.1111`, a newline
# between two messages). Groups are disjoint from separators: no backtracking.
# (Lookbehinds come after the first character: the engine then skips ahead to candidates.)
_DIGIT_RUN = re.compile(r"\d(?<![\d+]\d)\d*(?:[\s._/,|·*\-]{1,4}\d+)*")  # not `+49...`
_GROUP = re.compile(r"\d+")


def _cards(text: str) -> Iterator[tuple[int, int]]:
    for run in _DIGIT_RUN.finditer(text):
        if run.end() - run.start() < 13:  # most runs: a year, an amount, an order number
            continue
        groups = [(g.start(), g.end()) for g in _GROUP.finditer(text, run.start(), run.end())]
        i = 0
        while i < len(groups):
            best = None
            total = 0
            for j in range(i, len(groups)):
                size = groups[j][1] - groups[j][0]
                # Cards are written in groups of 3-6 digits (4-4-4-4, 4-6-5): short groups
                # are dates, versions and lists, not a card split up.
                if j > i and (size < 3 or groups[i][1] - groups[i][0] < 3):
                    break
                total += size
                if total > 19:
                    break
                if total >= 13:
                    digits = "".join(text[a:b] for a, b in groups[i : j + 1])
                    if digits[0] in "23456" and luhn(digits):
                        best = j
            if best is None:
                i += 1
                continue
            yield groups[i][0], groups[best][1]
            i = best + 1


# ------------------------------------------------------------------ IBANs

# ISO 13616 registry: IBAN length per country (the check digits alone pass 1 in 97).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip
_IBAN_CHECK = re.compile(r"\d\d(?<=[A-Za-z]{2}\d\d)(?<![A-Za-z0-9][A-Za-z]{2}\d\d)")
_IBAN_SEP = frozenset(" \t\n-._/")


def iban_ok(text: str) -> bool:
    s = re.sub(r"[^0-9A-Za-z]", "", text).upper()
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    number = "".join(str(int(c, 36)) for c in moved)
    return int(number) % 97 == 1


def _ibans(text: str) -> Iterator[tuple[int, int]]:
    for m in _IBAN_CHECK.finditer(text):
        start = m.start() - 2
        length = IBAN_LENGTHS.get(text[start : m.start()].upper())
        if length is None:
            continue
        chars, i, gap = 4, m.end(), 0
        while chars < length and i < len(text):
            c = text[i]
            if c.isascii() and c.isalnum():
                chars, gap = chars + 1, 0
            elif c in _IBAN_SEP and gap < 3:
                gap += 1
            else:
                break
            i += 1
        if chars == length and iban_ok(text[start:i]):
            yield start, i


# ------------------------------------------------------------------ e-mail addresses

_LOCAL_CHARS = frozenset(".!#$%&'*+/=?^_`{|}~-")
_DOMAIN = re.compile(
    r"\[[0-9A-Za-z:.]{2,45}\]"  # an address literal: [192.0.2.1], [IPv6:2001:db8::1]
    r"|[^\W_](?:[\w-]{0,62})(?:\.[^\W_][\w-]{0,62}){0,8}"  # IDN labels too
)
_TLD = re.compile(r"\.[^\W\d_]{2,63}$")
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")


def _local_start(text: str, end: int) -> int:
    """Where the local part that ends at `end` starts (== end: there is none)."""
    if end > 0 and text[end - 1] == '"':  # a quoted local part: "ann lee"@example.com
        q = text.rfind('"', max(0, end - 66), end - 1)
        if q >= 0 and "\n" not in text[q:end]:
            return q
    i = end
    while i > 0 and end - i < 64 and (text[i - 1].isalnum() or text[i - 1] in _LOCAL_CHARS):
        i -= 1
    while i < end and text[i] in ".":
        i += 1
    return i


def _emails(text: str) -> Iterator[tuple[int, int]]:
    at = text.find("@")
    while at >= 0:
        left = at
        while left > 0 and at - left < 3 and text[left - 1] in " \t\n":
            left -= 1
        right = at + 1
        while right < len(text) and right - at <= 3 and text[right] in " \t\n":
            right += 1
        spaced = left != at or right != at + 1
        start = _local_start(text, left)
        domain = _DOMAIN.match(text, right)
        if start < left and domain is not None:
            name = domain.group()
            plain_digits = name[0] != "[" and not any(c.isalpha() for c in name)
            if spaced and not _TLD.search(name):
                pass  # `meet me @ 5pm`: with spaces around @ only a full address counts
            elif plain_digits and not _IPV4.fullmatch(name):
                pass  # `lodash@4.17.21`: a version, not a host
            else:
                yield start, domain.end()
        at = text.find("@", at + 1)


# ------------------------------------------------------------------ phone numbers

# A run of digits with the separators phone numbers are written with, optionally after
# `+` or `(`. Bounded repetition: no backtracking blow-up.
_PHONE_RUN = re.compile(
    r"(?:\+(?<![\w+]\+)\s?\d|\((?<![\w+]\()\d|\d(?<![\w+]\d))[\d \t\n().\-/]{5,24}\d(?!\d)"
)
_DATEISH = re.compile(r"\d{4}([-./])\d{1,2}\1\d{1,2}|\d{1,2}([-./])\d{1,2}\2\d{4}")
# National numbers written with a trunk 0 are tried against these regions' plans; the
# NANP form (US, Canada) for numbers grouped 3-3-4.
TRUNK_REGIONS = ("GB", "FR", "DE", "IT", "NL", "BE", "CH", "AT", "IE", "AU", "NZ", "IN",
                 "JP", "BR", "ZA", "TR", "SE", "FI")  # fmt: skip


# Each candidate costs up to one libphonenumber parse per trunk region (~0.1 ms each): a
# text packed with candidates would cost seconds. Past this many, candidates that pass the
# cheap checks count as phone numbers unverified: closed, not open.
MAX_PHONE_CHECKS = 256


@lru_cache(maxsize=4096)
def _valid_phone(digits: str, region: str | None) -> bool:
    try:
        n = phonenumbers.parse(digits, region)
    except phonenumbers.NumberParseException:
        return False
    if region is None:  # `+CC...`: a strong signal, its length for the country is enough
        return phonenumbers.is_possible_number(n)
    return phonenumbers.is_valid_number(n)


def _phone_shaped(cand: str, after: str) -> bool:
    digits = re.sub(r"\D", "", cand)
    # Not too short or long, not a date, not a time stamp (`2024-05-01 12:30`).
    return 8 <= len(digits) <= 15 and not _DATEISH.search(cand) and not re.match(r":\d", after)


def _phone_ok(cand: str) -> bool:
    digits = re.sub(r"\D", "", cand)
    if cand.startswith("+"):
        return _valid_phone("+" + digits, None)
    if digits.startswith("00"):
        return _valid_phone("+" + digits[2:], None)
    if digits.startswith("0"):
        return any(_valid_phone(digits, r) for r in TRUNK_REGIONS)
    # The NANP (US, Canada) is written 3-3-4, with or without a leading 1; a bare run of
    # ten digits, or 4-6, is an order number.
    groups = [len(g) for g in re.findall(r"\d+", cand)]
    return groups in ([3, 3, 4], [1, 3, 3, 4]) and _valid_phone(digits, "US")


def _phones(text: str) -> Iterator[tuple[int, int]]:
    checked = 0
    for m in _PHONE_RUN.finditer(text):
        cand = m.group().rstrip()
        if not _phone_shaped(cand, text[m.end() : m.end() + 2]):
            continue
        checked += 1
        if checked > MAX_PHONE_CHECKS or _phone_ok(cand):
            yield m.start(), m.start() + len(cand)


# ------------------------------------------------------------------ scanner


@dataclass(frozen=True)
class Detector:
    kind: str
    spans: Callable[[str], Iterable[tuple[int, int]]]


def _pattern(rx: re.Pattern[str]) -> Callable[[str], Iterator[tuple[int, int]]]:
    return lambda text: ((m.start(), m.end()) for m in rx.finditer(text) if m.end() > m.start())


BUILTIN: dict[str, Detector] = {
    "email": Detector("email", _emails),
    "card": Detector("card", _cards),
    "iban": Detector("iban", _ibans),
    "phone": Detector("phone", _phones),
}


@dataclass(frozen=True)
class Match:
    kind: str
    start: int
    end: int
    key: str = ""  # the value, folded: one placeholder per distinct value


def _key(kind: str, value: str) -> str:
    return kind + ":" + re.sub(r"[\W_]+", "", value).lower()


class Scanner:
    def __init__(self, kinds: Iterable[str] = DETECTORS, custom: Iterable[str] = ()) -> None:
        # What it was built from, as cloud.sensitive / cloud.sensitive_patterns give them.
        self.detector_names = tuple(kinds)
        self.patterns = tuple(custom)
        if problem := unknown_detectors(self.detector_names):  # the names the config checks
            raise ValueError(problem)
        self.detectors = [BUILTIN[k] for k in self.detector_names]
        self.custom: list[Detector] = [
            Detector(f"custom{i}", _pattern(compile_pattern(rx)))
            for i, rx in enumerate(self.patterns)
        ]

    def find(self, text: str) -> list[Match]:
        """Every sensitive span in the original text, earliest first; where spans overlap
        the earlier detector wins. Custom patterns read the text as written and folded."""
        norm = normalise(text)
        found: list[Match] = []
        starts: list[int] = []  # of `found`, kept sorted: spans never overlap

        def add(kind: str, start: int, end: int, value: str) -> None:
            i = bisect_left(starts, end)
            if i and found[i - 1].end > start:
                return
            starts.insert(i, start)
            found.insert(i, Match(kind, start, end, _key(kind, value)))

        for d in [*self.detectors, *self.custom]:
            for a, b in d.spans(norm.text):
                add(d.kind, *norm.span(a, b), norm.text[a:b])
        if norm.text != text:
            for d in self.custom:
                for a, b in d.spans(text):
                    add(d.kind, a, b, text[a:b])
        return found

    def find_all(self, parts: Sequence[str]) -> list[list[Match]]:
        """Matches per part, found in the parts' concatenation: a value split across two
        messages (or a label and the text) is found, and its pieces are matched in each."""
        joined = "\n".join(parts)
        bounds, pos = [], 0
        for p in parts:
            bounds.append(pos)
            pos += len(p) + 1
        out: list[list[Match]] = [[] for _ in parts]
        for m in self.find(joined):
            for i in range(max(0, bisect_right(bounds, m.start) - 1), len(parts)):
                s = bounds[i]
                a, b = max(m.start, s) - s, min(m.end, s + len(parts[i])) - s
                if s > m.end:
                    break
                if b > a:
                    out[i].append(Match(m.kind, a, b, m.key))
        return out

    def kinds(self, texts: Iterable[str]) -> list[str]:
        """The kinds of sensitive data in the texts read as one, for the reply's reason."""
        return sorted({m.kind for m in self.find("\n".join(texts))})

    def redact_all(self, parts: Sequence[str]) -> list[str]:
        """Each part with every match (also one split across parts) replaced; the same
        value gets the same placeholder everywhere, so labels stay distinct."""
        names: dict[str, str] = {}
        return [redact(p, ms, names) for p, ms in zip(parts, self.find_all(parts), strict=True)]


def redact(text: str, matches: list[Match], names: dict[str, str] | None = None) -> str:
    names = {} if names is None else names
    out, pos = [], 0
    for m in sorted(matches, key=lambda m: m.start):
        if m.start < pos:
            continue
        key = m.key or f"{m.kind}:{text[m.start : m.end]}"
        if key not in names:
            n = 1 + sum(1 for k in names if k.split(":", 1)[0] == m.kind)
            names[key] = f"[{m.kind.upper()}]" if n == 1 else f"[{m.kind.upper()}_{n}]"
        out.append(text[pos : m.start])
        out.append(names[key])
        pos = m.end
    out.append(text[pos:])
    return "".join(out)
