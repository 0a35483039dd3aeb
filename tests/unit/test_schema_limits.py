"""A caller's JSON Schema is bounded before a grammar is built from it, and answers are
checked against it in linear time, off the event loop, within a time bound.

The attack schemas are the ones that crashed (SIGSEGV in llama.cpp's grammar parser) or
hung a worker, or froze the daemon's event loop for tens of seconds."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from sidecar import schema_limits, validate
from sidecar.domain.errors import InvalidRequest, SchemaViolation
from sidecar.domain.types import ExtractTask
from sidecar.validate import Limits, check, conforming_json, conforming_json_async

LIMITS = Limits(context=2048, max_labels=256, max_embed_texts=16)
LIMIT = schema_limits.MAX_REPEAT
# Python's backtracking `re` needs ~12 s for this pattern on 15 characters (x2.5 per char).
EVIL = "^(.|.|.)*(.|.)*X$"
EVIL_TEXT = "a" * 15


def refused(schema: Any) -> str:
    text = schema if isinstance(schema, str) else json.dumps(schema)
    with pytest.raises(InvalidRequest) as e:
        check(ExtractTask("t", text), LIMITS)
    assert type(e.value) is InvalidRequest  # INVALID_ARGUMENT, not a subclass
    return e.value.message


def nested(depth: int) -> str:
    """A schema nested `depth` objects deep, as text (json.dumps itself stops near 500)."""
    return '{"type":"object","properties":{"a":' * depth + '{"type":"string"}' + "}}" * depth


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({"type": "string", "maxLength": 30000}, ["maxLength", "/maxLength", "30000", str(LIMIT)]),
        ({"type": "string", "minLength": 10**6}, ["minLength", "/minLength", str(LIMIT)]),
        (
            {"type": "array", "items": {"type": "integer"}, "maxItems": 30000},
            ["maxItems", "/maxItems", str(LIMIT)],
        ),
        ({"type": "array", "items": {}, "maxItems": 10**9}, ["maxItems", "1000000000"]),
        ({"type": "array", "minItems": 5000}, ["minItems", str(LIMIT)]),
        ({"type": "object", "maxProperties": 10**7}, ["maxProperties", str(LIMIT)]),
        (
            {"type": "object", "properties": {"a/b": {"type": "string", "maxLength": 2e9}}},
            ["/properties/a~1b/maxLength"],
        ),
        (
            {"type": "string", "pattern": "^a{1,100000}$"},
            ["/pattern", "100000", str(schema_limits.MAX_PATTERN_REPEAT)],
        ),
        ({"type": "string", "pattern": "^(ab){5000}$"}, ["/pattern", "5000"]),
        # Refs can point anywhere, even into data the validator never reads: check everywhere.
        (
            {"$ref": "#/x-hidden", "x-hidden": {"type": "string", "maxLength": 30000}},
            ["/x-hidden/maxLength"],
        ),
    ],
)
def test_repetition_counts_past_the_limit_are_refused_naming_keyword_place_and_limit(
    schema: dict[str, Any], says: list[str]
) -> None:
    message = refused(schema)
    for s in says:
        assert s in message, message


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "maxLength": LIMIT},
        {"type": "string", "minLength": LIMIT, "maxLength": LIMIT},
        {"type": "array", "items": {"type": "integer"}, "maxItems": LIMIT},
        {"type": "string", "pattern": "^a{1,1000}$"},
        {"type": "string", "pattern": "^[a-z]+(-[a-z]+)*$"},
        {"type": "object", "properties": {"a": {"type": "string"}}, "maxProperties": 5},
        nested(30),
    ],
)
def test_schemas_just_inside_the_limits_pass(schema: Any) -> None:
    check(ExtractTask("t", schema if isinstance(schema, str) else json.dumps(schema)), LIMITS)


def test_deep_nesting_is_invalid_argument_not_a_recursion_error() -> None:
    assert "nested more than" in refused(nested(500))
    # Deeper than Python's own parser goes: still a clean refusal.
    deep = '{"not":' * 4000 + "{}" + "}" * 4000
    assert "nested" in refused(deep)
    assert "bytes" in refused('{"not":' * 100_000 + "{}" + "}" * 100_000)


def test_document_size_and_grammar_size_are_bounded() -> None:
    big = {"type": "object", "properties": {"a": {"description": "x" * 40_000}}}
    assert f"at most {schema_limits.MAX_SCHEMA_BYTES}" in refused(big)
    # Each field alone is inside the limits; together they would unroll into megabytes.
    wide = {
        "type": "object",
        "properties": {f"p{i}": {"type": "string", "maxLength": LIMIT} for i in range(200)},
    }
    message = refused(wide)
    assert "grammar" in message and str(schema_limits.MAX_GRAMMAR_BYTES) in message


def test_many_optional_properties_are_refused_but_required_ones_pass() -> None:
    # The converter's work grows with the cube of an object's optional properties.
    n = schema_limits.MAX_OPTIONAL_PROPERTIES + 1
    props = {f"p{i}": True for i in range(n)}  # boolean subschemas: any value
    message = refused({"type": "object", "properties": props})
    assert "optional" in message and str(n - 1) in message and "required" in message
    check(
        ExtractTask(
            "t", json.dumps({"type": "object", "properties": props, "required": list(props)})
        ),
        LIMITS,
    )


def test_pattern_repetitions_are_bounded_per_pattern_and_in_all() -> None:
    # Nested quantifiers multiply (RE2 and the grammar both expand them).
    assert "2550 times" in refused({"type": "string", "pattern": "^(a{50}){50}$"})
    assert "1200 times" in refused({"type": "string", "pattern": "^" + "a{1,600}" * 2 + "$"})
    # RE2's compile time grows faster than linearly: 60 x a{1,999} took 19 s to compile.
    keys = {f"^x{i}a{{1,999}}$": {} for i in range(40)}
    started = time.perf_counter()
    message = refused({"type": "object", "patternProperties": keys})
    assert str(schema_limits.MAX_TOTAL_PATTERN_REPEAT) in message and "in all" in message
    assert time.perf_counter() - started < 5.0


def test_checking_a_schema_stays_cheap() -> None:
    """The request-time check runs on the event loop: its worst cases must stay small."""
    n = schema_limits.MAX_SUBSCHEMAS - 1
    worst = [
        {"type": "string", "pattern": "^" + "(a|b)*" * (schema_limits.MAX_SCHEMA_BYTES // 7) + "$"},
        {"type": "object", "required": [f"p{i}" for i in range(n)],
         "properties": {f"p{i}": {"type": "string", "maxLength": 3} for i in range(n)}},
        {"type": "object", "patternProperties": {
            f"^k{i}a{{1,300}}$": {} for i in range(schema_limits.MAX_PATTERNS)}},
    ]  # fmt: skip
    for schema in worst:
        started = time.perf_counter()
        check(ExtractTask("t", json.dumps(schema)), LIMITS)
        assert time.perf_counter() - started < 5.0
    too_many = [
        ({"type": "object", "properties": {f"p{i}": {} for i in range(n + 2)},
          "required": [f"p{i}" for i in range(n + 2)]}, "subschemas"),
        ({"type": "object", "patternProperties": {f"^k{i}$": {} for i in range(2000)}},
         "patterns"),
    ]  # fmt: skip
    for schema, says in too_many:
        started = time.perf_counter()
        assert says in refused(schema)
        assert time.perf_counter() - started < 5.0


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        ({"type": "string", "pattern": "^(a+)\\1$"}, "/pattern"),
        ({"type": "string", "pattern": "^(?=a)a$"}, "/pattern"),
        ({"type": "object", "patternProperties": {"(?<!x)y": {}}}, "/patternProperties/(?<!x)y"),
    ],
)
def test_patterns_re2_cannot_run_in_linear_time_are_refused(
    schema: dict[str, Any], where: str
) -> None:
    message = refused(schema)
    assert where in message and "RE2" in message and "lookaround" in message


def test_unevaluated_properties_with_pattern_properties_is_refused() -> None:
    # jsonschema matches patternProperties for unevaluatedProperties with Python's `re`.
    schema = {"patternProperties": {"^a": {}}, "unevaluatedProperties": False}
    assert "unevaluatedProperties" in refused(schema)


def test_a_catastrophic_pattern_is_checked_in_linear_time() -> None:
    cases = [
        ({"type": "string", "pattern": EVIL}, json.dumps(EVIL_TEXT * 1000), False),
        # The key does not match, so the property is not checked: valid, and fast.
        ({"type": "object", "patternProperties": {EVIL: {"type": "integer"}}},
         json.dumps({EVIL_TEXT * 1000: "not an integer"}), True),
        ({"type": "object", "properties": {}, "patternProperties": {EVIL: {}},
          "additionalProperties": False}, json.dumps({EVIL_TEXT: 1}), False),
    ]  # fmt: skip
    for schema, answer, valid in cases:
        started = time.perf_counter()
        try:
            conforming_json(answer, json.dumps(schema))
            assert valid, schema
        except SchemaViolation:
            assert not valid, schema
        assert time.perf_counter() - started < 5.0
    # Matching is still JSON Schema's: unanchored search.
    assert conforming_json('"xbx"', json.dumps({"pattern": "b"})) == '"xbx"'
    with pytest.raises(SchemaViolation, match="does not match"):
        conforming_json('"xyz"', json.dumps({"pattern": "^b"}))


def test_unique_items_is_checked_in_linear_time_with_json_equality() -> None:
    schema = json.dumps({"type": "array", "uniqueItems": True})
    distinct = json.dumps([{"a": i} for i in range(30_000)])
    started = time.perf_counter()
    assert conforming_json(distinct, schema) == distinct.replace(" ", "")
    assert time.perf_counter() - started < 10.0
    for dup in ([1, 1.0], [{"a": [1]}, {"a": [1.0]}], [{"a": 1, "b": 2}, {"b": 2, "a": 1}]):
        with pytest.raises(SchemaViolation, match="non-unique"):
            conforming_json(json.dumps(dup), schema)
    for ok in ([1, True], [0, False], [[1], [True]], ["1", 1]):
        conforming_json(json.dumps(ok), schema)


def test_answers_are_bounded_in_size_and_depth_and_messages_in_length() -> None:
    schema = json.dumps({"type": "string", "maxLength": 3})
    with pytest.raises(SchemaViolation, match="at most"):
        conforming_json(json.dumps("x" * (validate.MAX_ANSWER_CHARS + 1)), schema)
    with pytest.raises(SchemaViolation, match="nested"):
        conforming_json("[" * 50_000 + "]" * 50_000, json.dumps({}))
    with pytest.raises(SchemaViolation) as e:
        conforming_json(json.dumps("y" * 100_000), schema)
    assert len(e.value.message) < 600


def test_validation_past_its_time_bound_is_a_schema_violation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(validate, "VALIDATE_SECONDS", 0.0)
    with pytest.raises(SchemaViolation, match=r"could not be checked .* within"):
        conforming_json(json.dumps([1, 2, 3]), json.dumps({"items": {"type": "integer"}}))


async def test_the_async_check_leaves_the_event_loop_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(validate, "VALIDATE_SECONDS", 60.0)  # a loaded machine is slow
    schema = json.dumps({"type": "array", "items": {"type": "object", "required": ["a"]}})
    answer = json.dumps([{"a": i, "b": [i, i]} for i in range(30_000)])
    lag = 0.0

    async def ticker() -> None:
        nonlocal lag
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            lag = max(lag, time.perf_counter() - t - 0.01)

    tick = asyncio.create_task(ticker())
    started = time.perf_counter()
    out = await conforming_json_async(answer, schema)
    took = time.perf_counter() - started
    tick.cancel()
    assert json.loads(out)[-1]["a"] == 29_999
    assert lag < max(0.5, took / 2), (lag, took)
    with pytest.raises(SchemaViolation):
        await conforming_json_async(json.dumps(EVIL_TEXT), json.dumps({"pattern": EVIL}))
