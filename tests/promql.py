"""What the shipped dashboard and alerting rules query, and whether a scrape has it.

A small PromQL tokenizer, enough for the expressions we write: it finds every series
selector (a name, with or without `{matchers}`), the label matchers, and the labels named
in `by`/`without`/`on`/`ignoring` clauses. Functions and aggregations are identifiers
followed by `(`; keywords and numbers are skipped; `[range]` blocks and Grafana variables
(`$model`, `$__rate_interval`) are not names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "packaging" / "grafana" / "sidecar-dashboard.json"
RULES = REPO / "packaging" / "prometheus" / "sidecar-alerts.yml"

# Labels Prometheus attaches to every scraped series (target labels), and series it makes
# itself: never in the daemon's own exposition.
TARGET_LABELS = {"instance", "job"}
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

_TOKEN = re.compile(
    r"""
      (?P<string>"(?:[^"\\]|\\.)*")
    | (?P<matchers>\{[^}]*\})
    | (?P<range>\[[^\]]*\])
    | (?P<var>\$\w+)
    | (?P<number>\d[\w.]*)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<other>\S)
    """,
    re.VERBOSE,
)
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
KEYWORDS = {"bool", "and", "or", "unless", "offset", "inf", "nan"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}


@dataclass
class Selector:
    name: str
    matchers: list[tuple[str, str, str]] = field(default_factory=list)  # (label, op, value)


@dataclass
class Query:
    where: str  # the panel or alert it came from
    expr: str
    selectors: list[Selector]
    grouping: set[str]


def parse(expr: str, where: str = "") -> Query:
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    selectors: list[Selector] = []
    grouping: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else (None, "")
        if kind == "ident":
            low = text.lower()
            if low in GROUPING:
                if nxt[1] == "(":  # a label list: by (a, b)
                    j = i + 2
                    while j < len(tokens) and tokens[j][1] != ")":
                        if tokens[j][0] == "ident":
                            grouping.add(tokens[j][1])
                        j += 1
                    i = j
            elif nxt[1] == "(" or nxt[1].lower() in GROUPING:
                pass  # a function, or an aggregation (`sum by (x) (...)` too)
            elif low not in KEYWORDS:
                sel = Selector(text)
                if nxt[0] == "matchers":
                    sel.matchers = _MATCHER.findall(nxt[1])
                    i += 1
                selectors.append(sel)
        i += 1
    return Query(where, expr, selectors, grouping)


def dashboard_queries(dashboard: dict[str, Any] | None = None) -> Iterator[Query]:
    d = dashboard if dashboard is not None else json.loads(DASHBOARD.read_text())
    for panel in _panels(d.get("panels", [])):
        for t in panel.get("targets", []):
            yield parse(t["expr"], f"panel {panel['title']!r} {t['refId']}")
    for var in d.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
            assert inner, f"variable {var['name']}: unexpected query {q!r}"
            parsed = parse(inner.group(1), f"variable {var['name']!r}")
            parsed.grouping.add(inner.group(2))  # the label whose values it lists
            yield parsed


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def rule_queries(text: str | None = None) -> Iterator[Query]:
    """The `expr` of every rule in a rules file (plain or `|` block scalars: all we write;
    no YAML library, which the project does not otherwise need)."""
    lines = (text if text is not None else RULES.read_text()).splitlines()
    name = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        head = re.match(r"\s*-?\s*(alert|record):\s*(\S+)", line)
        if head:
            name = head.group(2)
        m = re.match(r"(\s*)expr:\s*(.*)$", line)
        if m:
            expr = m.group(2).strip()
            if expr in ("|", ">", "|-", ">-"):
                indent = len(m.group(1))
                body = []
                while i + 1 < len(lines) and (
                    not lines[i + 1].strip()
                    or len(lines[i + 1]) - len(lines[i + 1].lstrip()) > indent
                ):
                    i += 1
                    body.append(lines[i].strip())
                expr = " ".join(b for b in body if b)
            yield parse(expr, f"rule {name}")
        i += 1


Scrape = dict[str, list[dict[str, str]]]  # sample name -> the label sets it has


def problems(queries: list[Query], scrape: Scrape) -> list[str]:
    """What the queries ask for that the scrape does not have: names, label values
    matched with `=`, and labels any matcher or grouping clause names."""
    out = []
    for q in queries:
        labels_here: set[str] = set(TARGET_LABELS)
        for sel in q.selectors:
            if sel.name in SYNTHETIC:
                labels_here |= {"job", "instance"}
                continue
            series = scrape.get(sel.name)
            if not series:
                out.append(f"{q.where}: {sel.name} is not in the exposition")
                continue
            have = {k for s in series for k in s}
            labels_here |= have
            for label, op, value in sel.matchers:
                if label in TARGET_LABELS:
                    continue
                if label not in have:
                    out.append(f"{q.where}: {sel.name} has no label {label!r}")
                elif (
                    op == "="
                    and "$" not in value
                    and not any(s.get(label) == value for s in series)
                ):
                    out.append(f"{q.where}: no {sel.name} series has {label}={value!r}")
        for label in sorted(q.grouping - labels_here):
            out.append(f"{q.where}: groups by {label!r}, which none of its series has")
    return out
