"""Schema keywords the grammar cannot enforce are refused by name, and the grammar
converter's own failures reach the caller in the daemon's words (issue 13)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sidecar.domain.errors import InvalidRequest
from sidecar.domain.types import ExtractTask
from sidecar.schema_limits import UNENFORCEABLE, converter_refusal
from sidecar.validate import Limits, check
from sidecar.worker.runner import _grammar

LIMITS = Limits(context=2048, max_labels=256, max_embed_texts=16)
OBJECT = {"type": "object", "properties": {"a": {"type": "string"}}}


def refused(schema: Any) -> str:
    with pytest.raises(InvalidRequest) as e:
        check(ExtractTask("t", json.dumps(schema)), LIMITS)
    assert type(e.value) is InvalidRequest
    return e.value.message


VALUES = {
    "not": {},
    "if": {"type": "string"},
    "then": {"type": "string"},
    "else": {"type": "string"},
    "dependentRequired": {"a": ["b"]},
    "dependentSchemas": {"a": {"required": ["b"]}},
    "dependencies": {"a": ["b"]},
    "propertyNames": {"maxLength": 3},
    "contains": {"const": 1},
    "minContains": 1,
    "maxContains": 2,
    "unevaluatedItems": False,
}


@pytest.mark.parametrize("keyword", sorted(UNENFORCEABLE))
def test_each_unenforceable_keyword_is_refused_by_name_with_what_to_write(keyword: str) -> None:
    assert keyword in VALUES  # a keyword added to the table gets a case here
    message = refused({"type": "object", "properties": {"x": {keyword: VALUES[keyword]}}})
    assert f"/properties/x/{keyword}: `{keyword}` is not supported" in message
    assert UNENFORCEABLE[keyword] in message


@pytest.mark.parametrize(
    "schema",
    [
        # Names and data that look like the keywords are not keywords.
        {"type": "object", "properties": {"not": {"type": "string"}, "if": {"type": "integer"}}},
        {"type": "object", "required": ["not"], "properties": {"not": {"type": "string"}}},
        {"enum": [{"not": 1}, {"contains": 2}]},
        {"const": {"if": "then"}},
        {"type": "string", "default": {"not": {}}, "examples": [{"not": {}}]},
        # Value checks the grammar ignores are checked on the answer instead.
        {"type": "integer", "minimum": 0, "maximum": 120, "multipleOf": 1},
        {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        {"type": "string", "format": "email"},
    ],
)
def test_look_alikes_and_value_checks_are_accepted(schema: dict[str, Any]) -> None:
    check(ExtractTask("t", json.dumps(schema)), LIMITS)


def test_a_keyword_reached_only_through_ref_is_refused() -> None:
    schema = {"$defs": {"odd": {"not": {"type": "string"}}}, "$ref": "#/$defs/odd"}
    assert "/$defs/odd/not" in refused(schema)


@pytest.mark.parametrize(
    ("schema", "advice"),
    [
        ({"minimum": 0}, "give each one a `type`"),
        ({"type": "string", "pattern": "abc"}, "start it with ^ and end it with $"),
        ({"type": "string", "pattern": "^a(?:b)$"}, "use plain (...) groups"),
        ({"$ref": "#/$defs/missing"}, "points to nothing in the document"),
        ({"$defs": {"a": {"type": "string"}}, "$ref": "#a"}, "#/$defs/NAME"),
    ],
)
def test_the_converters_failures_say_what_to_change(schema: dict[str, Any], advice: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        _grammar(json.dumps(schema))
    message = e.value.message
    assert advice in message
    # Nothing of the converter's own wording: its CLI options, its dump of the schema.
    for leak in ("Unrecognized", "stdin", "{'", "assert", "Unsupported"):
        assert leak not in message, message


def test_no_converter_message_mentions_its_command_line_options() -> None:
    remote = converter_refusal(
        AssertionError("Fetching remote schemas is not allowed (use --allow-fetch for force)")
    )
    assert "--allow-fetch" not in remote.message and "local references" in remote.message
    # A remote $ref never reaches the converter: the daemon refuses it first.
    with pytest.raises(InvalidRequest, match="points outside the document"):
        _grammar(json.dumps({"$ref": "https://example.com/s.json"}))
    other = converter_refusal(ValueError("something new"))
    assert other.message.startswith("json_schema cannot be turned into a grammar")
