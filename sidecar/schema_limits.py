"""Bounds on a caller's JSON Schema, checked before anything builds a grammar from it.

llama-cpp-python's schema-to-grammar converter unrolls every repetition: `maxLength: n`
becomes n nested optional groups, and llama.cpp's grammar parser recurses once per group.
Past ~18,700 it overflows the worker's stack (SIGSEGV); at `maxItems: 10**9` the converter
never finishes building the string. So counts, nesting, document size and the grammar the
converter would write are all bounded here, in the daemon, on the raw text, by a walk that
does not recurse (a 100k-deep document must not crash the check itself). The worker runs
the same check again before it converts: it is the process that would crash.

Every `pattern` must also compile in RE2, the linear-time engine answers are checked with:
a pattern RE2 refuses (backreferences, lookaround) could only be checked by a backtracking
engine, which a crafted pattern can keep busy for minutes.

Limits are module constants rather than config keys: they protect llama.cpp, whose limits
do not change with the deployment. Measured thresholds are in the design notes of the docs.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
from dataclasses import dataclass, field
from typing import Any

import re2

from sidecar.domain.errors import InvalidRequest

# Each count the converter unrolls becomes that many nested optional groups. llama.cpp
# refuses more than 1000 ("exceeds sane defaults") and overflows the worker's 8 MiB stack
# (SIGSEGV) from ~18,700; 1000 is where its own grammar parser still says yes.
MAX_REPEAT = 1000
# RE2 refuses more than 1000 repetitions of one thing anyway; this says so with a pointer,
# and bounds a pattern's total (RE2 compiles 1000 in ~3 ms, 60k in 19 s).
MAX_PATTERN_REPEAT = 1000
MAX_TOTAL_PATTERN_REPEAT = 20 * MAX_PATTERN_REPEAT
# A schema goes into the prompt too: 32 KiB is ~10k tokens, past most small models' context.
MAX_SCHEMA_BYTES = 32 * 1024
# JSON nesting of the document (each object level of a schema is two: properties + child).
MAX_SCHEMA_DEPTH = 64
# Estimate of the GBNF text the converter writes (see `_Tally.keyword`); 800 KB ran fine.
MAX_GRAMMAR_BYTES = 1024 * 1024
# The converter's work grows with the cube of an object's optional properties (900 took
# 6 s, 1000 overflow its recursion), in the worker, deaf to pings: bound their total.
MAX_OPTIONAL_PROPERTIES = 256
# The request-time check runs on the event loop, and jsonschema's check against the
# 2020-12 metaschema costs ~0.7 ms per subschema (2000 took 1.4 s), compiling each pattern
# ~1 ms more: bound both so the worst schema costs ~0.2 s.
MAX_SUBSCHEMAS = 256
MAX_PATTERNS = 64

COUNT_KEYWORDS = (
    "maxLength",
    "minLength",
    "maxItems",
    "minItems",
    "maxProperties",
    "minProperties",
    "maxContains",
    "minContains",
)
# Grammar bytes per unit of the counts the converter unrolls: (fixed, per byte of the rule
# name). The other counts only bound validation.
_UNROLLED = {"maxLength": (8, 0), "minLength": (8, 0), "maxItems": (24, 1), "minItems": (24, 1)}
# Keywords whose object value maps names to subschemas: the converter does not put the
# keyword itself into rule names, only the names under it.
_NAME_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")

# Keywords llama.cpp's converter ignores that decide which shapes an answer may have at all:
# the grammar would let the model write what they forbid or leave out what they require, so
# a local answer would pass only by chance. They are refused by name, with what to write
# instead. The value checks it also ignores (minimum, maximum, multipleOf, uniqueItems,
# format, minProperties, maxProperties) are accepted: every answer is checked against the
# whole schema, and one that misses them is a schema violation.
UNENFORCEABLE = {
    "not": "describe what is allowed instead (type, enum, anyOf, pattern)",
    "if": "use anyOf with one subschema per case",
    "then": "use anyOf with one subschema per case",
    "else": "use anyOf with one subschema per case",
    "dependentRequired": "list the properties in `required`, or use anyOf with one subschema per case",
    "dependentSchemas": "use anyOf with one subschema per case",
    "dependencies": "list the properties in `required`, or use anyOf with one subschema per case",
    "propertyNames": "list the names in `properties` with additionalProperties false",
    "contains": "describe every item with `items` (an enum or anyOf)",
    "minContains": "describe every item with `items` (an enum or anyOf)",
    "maxContains": "describe every item with `items` (an enum or anyOf)",
    "unevaluatedItems": "use `items` or `prefixItems`",
}
# Keywords whose values are data, not schemas: a property named "not" in a `const` is fine.
_LITERALS = ("enum", "const", "default", "examples")

_sre = importlib.import_module("re._parser" if sys.version_info >= (3, 11) else "sre_parse")
_REPEATS = ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")


def bounded_schema(text: str) -> dict[str, Any]:
    """The parsed schema document, or InvalidRequest naming the keyword, where and the limit.

    The result may be shared between calls (it is cached by text): never modify it."""
    size = len(text.encode("utf-8"))
    if size > MAX_SCHEMA_BYTES:
        raise InvalidRequest(f"json_schema is {size} bytes; at most {MAX_SCHEMA_BYTES} are allowed")
    return _bounded(text)


@functools.lru_cache(maxsize=32)  # callers send the same schema request after request
def _bounded(text: str) -> dict[str, Any]:
    try:
        schema = json.loads(text)
    except RecursionError:
        raise InvalidRequest(
            f"json_schema is nested more than {MAX_SCHEMA_DEPTH} levels deep: flatten it"
        ) from None
    except ValueError as e:
        raise InvalidRequest(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise InvalidRequest("json_schema must be a JSON object (a JSON Schema document)")
    tally = _Tally(grammar=2 * len(text))  # literals (enum, const, names) are copied, escaped
    # (node, JSON pointer, depth, length of the grammar rule name the converter derives,
    # whether the node maps names to subschemas rather than being one)
    stack: list[tuple[Any, str, int, int, bool]] = [(schema, "", 1, 4, False)]
    while stack:
        node, where, depth, name, is_map = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise InvalidRequest(
                f"json_schema is nested more than {MAX_SCHEMA_DEPTH} levels deep "
                f"(at {where or '/'}): flatten it"
            )
        if isinstance(node, list):
            stack.extend(
                (v, f"{where}/{i}", depth + 1, name + 3, False) for i, v in enumerate(node)
            )
        elif isinstance(node, dict):
            if not is_map:
                tally.subschema(node, where, name)
            for key, value in node.items():
                at = f"{where}/{_escape(key)}"
                tally.keyword(key, value, at, name)
                maps = key in _NAME_MAPS and not is_map
                step = 0 if maps else 1 + len(key)  # rule names join property names by "-"
                if isinstance(value, dict | list):
                    stack.append((value, at, depth + 1, name + step, maps))
            tally.check(where)
    if {"unevaluatedProperties", "patternProperties"} <= tally.seen:
        # jsonschema matches patternProperties for unevaluatedProperties with Python's
        # backtracking `re`, which no keyword override reaches.
        raise InvalidRequest(
            "json_schema uses unevaluatedProperties together with patternProperties, which "
            "cannot be checked in linear time: use additionalProperties instead"
        )
    _refuse_unenforceable(schema)
    return schema


def _refuse_unenforceable(schema: dict[str, Any]) -> None:
    """InvalidRequest naming the first UNENFORCEABLE keyword at a schema position. Depth
    and size were bounded by the caller's walk."""
    stack: list[tuple[Any, str]] = [(schema, "")]
    while stack:
        node, where = stack.pop()
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            at = f"{where}/{_escape(key)}"
            if key in UNENFORCEABLE:
                raise InvalidRequest(
                    f"json_schema {at}: `{key}` is not supported (the grammar that shapes "
                    f"local answers cannot enforce it): {UNENFORCEABLE[key]}"
                )
            if key in _LITERALS:
                continue
            if key in _NAME_MAPS and isinstance(value, dict):
                stack.extend((v, f"{at}/{_escape(k)}") for k, v in value.items())
            elif isinstance(value, dict):
                stack.append((value, at))
            elif isinstance(value, list):
                stack.extend((v, f"{at}/{i}") for i, v in enumerate(value))


@dataclass
class _Tally:
    """What the schema costs so far, and the checks that need the whole document."""

    grammar: int  # estimated bytes of GBNF
    subschemas: int = 0
    optional: int = 0  # optional properties (the converter's cubic part)
    patterns: int = 0
    pattern_units: int = 0  # repetitions RE2 compiles, over every pattern
    seen: set[str] = field(default_factory=set)  # keywords that matter in combination

    def subschema(self, node: dict[str, Any], where: str, name: int) -> None:
        self.subschemas += 1
        if self.subschemas > MAX_SUBSCHEMAS:
            raise InvalidRequest(
                f"json_schema has more than {MAX_SUBSCHEMAS} subschemas (objects; reached at "
                f"{where or '/'}): simplify it"
            )
        self.grammar += 8 * (name + 8)  # a few rules, each naming the next ones
        self.optional += _optional_properties(node)
        if self.optional > MAX_OPTIONAL_PROPERTIES:
            raise InvalidRequest(
                f"json_schema has more than {MAX_OPTIONAL_PROPERTIES} optional properties "
                f"(reached at {where or ''}/properties): list more of them in `required`"
            )

    def keyword(self, key: str, value: Any, at: str, name: int) -> None:
        self.seen.add(key)
        if key in COUNT_KEYWORDS and _is_number(value):
            if not value <= MAX_REPEAT:  # NaN included
                raise InvalidRequest(
                    f"json_schema {at}: {key} is {value}; at most {MAX_REPEAT} is allowed"
                )
            # Unrolled as `(char (char ...)?)?` for strings, `("," space item ...)?` for arrays.
            fixed, per_name = _UNROLLED.get(key, (0, 0))
            self.grammar += max(0, int(value)) * (fixed + per_name * name)
        elif key == "pattern" and isinstance(value, str):
            units = self.pattern(value, at)
            self.grammar += units * (name + 16)
        elif key == "patternProperties" and isinstance(value, dict):
            for p in value:
                self.pattern(p, f"{at}/{_escape(p)}")
        elif key == "$ref" and isinstance(value, str) and not value.startswith("#"):
            # Nothing is fetched: the converter refuses remote refs and jsonschema cannot
            # resolve them, so say so before a worker or the cloud is asked.
            raise InvalidRequest(
                f"json_schema {at}: $ref {_short(value)} points outside the document; only "
                "local references (#/...) are supported"
            )

    def pattern(self, pattern: str, at: str) -> int:
        self.patterns += 1
        if self.patterns > MAX_PATTERNS:
            raise InvalidRequest(
                f"json_schema has more than {MAX_PATTERNS} patterns (reached at {at}): "
                "use fewer pattern or patternProperties entries"
            )
        units = check_pattern(pattern, at)
        self.pattern_units += units
        return units

    def check(self, where: str) -> None:
        if self.grammar > MAX_GRAMMAR_BYTES:
            raise InvalidRequest(
                f"json_schema would need a grammar of more than {MAX_GRAMMAR_BYTES} bytes "
                f"(reached at {where or '/'}): use smaller repetition counts "
                "(maxLength, maxItems, pattern quantifiers), fewer properties or shorter names"
            )
        if self.pattern_units > MAX_TOTAL_PATTERN_REPEAT:
            # RE2's compile time grows faster than linearly with repetitions.
            raise InvalidRequest(
                f"json_schema's patterns repeat more than {MAX_TOTAL_PATTERN_REPEAT} times "
                f"in all (reached at {where or '/'}): use fewer or smaller quantifiers"
            )


def _optional_properties(node: dict[str, Any]) -> int:
    props = node.get("properties")
    if not isinstance(props, dict):
        return 0
    required = node.get("required")
    names = {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()
    return sum(1 for k in props if k not in names)


def check_pattern(pattern: str, at: str) -> int:
    """Refuse a pattern RE2 cannot run or that repeats past the limit; return how many
    repetitions it expands to (nested quantifiers multiply, as they do in RE2 and in the
    grammar)."""
    try:
        tree = _sre.parse(pattern)
    except RecursionError:
        raise InvalidRequest(f"json_schema {at}: the pattern nests groups too deeply") from None
    except Exception:
        tree = None  # RE2's own verdict below names the problem
    units = 0
    stack: list[tuple[Any, int]] = [(tree, 1)] if tree is not None else []
    while stack:
        sub, times = stack.pop()
        for op, arg in sub:
            kind = str(op)
            if kind in _REPEATS:
                low, high, inner = arg
                count = times * (low if high == _sre.MAXREPEAT else high)
                units += count
                if units > MAX_PATTERN_REPEAT:
                    raise InvalidRequest(
                        f"json_schema {at}: the pattern repeats {units} times (nested "
                        f"quantifiers multiply); at most {MAX_PATTERN_REPEAT} are allowed"
                    )
                stack.append((inner, max(count, 1)))
            else:
                stack.extend((c, times) for c in _children(kind, arg))
    err = _re2_error(pattern)
    if err is not None and tree is None:
        raise InvalidRequest(
            f"json_schema {at}: pattern {_short(pattern)} is not a valid regular expression ({err})"
        )
    if err is not None:
        raise InvalidRequest(
            f"json_schema {at}: pattern {_short(pattern)} cannot be checked in linear time "
            f"(RE2 refuses it: {err}); backreferences and lookaround are not supported"
        )
    return units


def _children(kind: str, arg: Any) -> list[Any]:
    """Sub-patterns of one parsed regex node."""
    if kind == "SUBPATTERN":
        return [arg[-1]]
    if kind == "BRANCH":
        return list(arg[1])
    if kind in ("ASSERT", "ASSERT_NOT"):
        return [arg[1]]
    if kind == "ATOMIC_GROUP":
        return [arg]
    if kind == "GROUPREF_EXISTS":
        return [p for p in arg[1:] if p is not None]
    return []


@functools.lru_cache(maxsize=64)
def compiled(pattern: str) -> Any:
    """RE2's compiled form of a pattern (cached: the same schema comes back request after request)."""
    return re2.compile(pattern, _OPTIONS)


_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # RE2 would print the caller's pattern to stderr, newlines and all
# Program and lazily built DFA of one pattern (default 8 MiB; a 1000-repetition pattern
# needs far less, and past the budget RE2 falls back to its slower, still linear, NFA).
_OPTIONS.max_mem = 2 << 20


def _re2_error(pattern: str) -> str | None:
    try:
        compiled(pattern)
    except re2.error as e:
        why = e.args[0] if e.args else "invalid pattern"
        return why.decode("utf-8", "replace") if isinstance(why, bytes) else str(why)
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _short(pattern: str) -> str:
    return repr(pattern if len(pattern) <= 80 else pattern[:77] + "...")


# llama.cpp's schema-to-grammar converter raises bare assertions and ValueErrors written for
# its command-line tool (`--allow-fetch`), with the caller's schema dumped into them: its
# known failures, by the start of its message, as what the caller can change.
_CONVERTER = (
    (
        "Unrecognized schema",
        "a subschema has nothing a grammar can be built from: give each one a `type` "
        "(or `properties`, `items`, `enum`, `const`, `anyOf`)",
    ),
    (
        "Pattern must start with",
        "every `pattern` must be anchored for the grammar: start it with ^ and end it with $ "
        "(for `abc` anywhere, write ^.*abc.*$)",
    ),
    (
        "Unsupported pattern syntax",
        "a `pattern` uses (?...) syntax (non-capturing groups, lookaround, flags), which the "
        "grammar cannot express: use plain (...) groups",
    ),
    ("Unsupported ref", "a `$ref` is not a JSON pointer: write it as #/$defs/NAME"),
    ("Error resolving ref", "a `$ref` points to nothing in the document"),
    ("Fetching remote schemas", "only local references (#/...) are supported"),
)


def converter_refusal(error: Exception) -> InvalidRequest:
    """The converter's `error` in the daemon's words (INVALID_ARGUMENT)."""
    text = str(error)
    for start, advice in _CONVERTER:
        if text.startswith(start):
            return InvalidRequest(f"json_schema cannot be turned into a grammar: {advice}")
    return InvalidRequest(
        f"json_schema cannot be turned into a grammar ({_short(text)}): simplify the schema"
    )
