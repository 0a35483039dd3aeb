"""Checks on a request before it waits for a worker, so bad input fails fast and cheap.

What needs the tokenizer (does the prompt fit the context?) is checked by the worker.
Every message says what to change.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jsonschema
import referencing.exceptions
from jsonschema.exceptions import ValidationError

from sidecar.domain.errors import ContextOverflow, InvalidRequest, OutOfRange, SchemaViolation
from sidecar.domain.types import (
    MAX_TOP_LOGPROBS,
    ChatTask,
    ClassifyTask,
    EmbedTask,
    ExtractTask,
    GenerateTask,
    Sampling,
    Task,
)
from sidecar.schema_limits import bounded_schema, compiled

ROLES = ("system", "user", "assistant")
MAX_STOP_SEQUENCES = 8
MAX_LABEL_CHARS = 200
# Answers are checked against the caller's schema: bound the work (an Extract answer is a
# few KB; a cloud could send megabytes).
MAX_ANSWER_CHARS = 1024 * 1024
VALIDATE_SECONDS = 2.0
# Each message adds template tokens (special ones among them) that llama.cpp's tokenizer
# handles in time quadratic in their number: 100k one-character messages kept a worker
# busy for many minutes, deaf to pings. A context window holds far fewer messages anyway.
MAX_CHAT_MESSAGES = 1024


@dataclass(frozen=True)
class Limits:
    context: int
    max_labels: int
    max_embed_texts: int


def check(task: Task, limits: Limits) -> None:
    CHECKS[type(task)](task, limits)


def _max_tokens(value: int | None, limits: Limits) -> None:
    if value is None:
        return
    if value <= 0:
        raise InvalidRequest(
            f"max_tokens must be at least 1 (leave it unset for the default), got {value}"
        )
    if value > limits.context:
        raise ContextOverflow(
            f"max_tokens {value} is larger than the model's whole context window ({limits.context} tokens)"
        )


def _sampling(s: Sampling) -> None:
    if not 0.0 <= s.temperature <= 5.0:
        raise InvalidRequest(f"sampling.temperature must be in [0, 5], got {s.temperature}")
    if not 0.0 <= s.top_p <= 1.0:
        raise InvalidRequest(f"sampling.top_p must be in [0, 1], got {s.top_p}")
    if s.top_k < 0:
        raise InvalidRequest(f"sampling.top_k must be >= 0, got {s.top_k}")
    if s.repeat_penalty < 0:
        raise InvalidRequest(f"sampling.repeat_penalty must be >= 0, got {s.repeat_penalty}")
    if len(s.stop) > MAX_STOP_SEQUENCES or any(not x for x in s.stop):
        raise InvalidRequest(
            f"sampling.stop takes at most {MAX_STOP_SEQUENCES} non-empty sequences"
        )


def check_logprobs(logprobs: bool, top_logprobs: int) -> None:
    """Also called by the HTTP front end, whose fields have the same names."""
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(
            f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {top_logprobs}"
        )
    if top_logprobs and not logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: set logprobs to true as well")


def _generate(task: GenerateTask, limits: Limits) -> None:
    if not task.prompt:
        raise InvalidRequest("prompt is empty: send the text to continue")
    _max_tokens(task.max_tokens, limits)
    _sampling(task.sampling)
    check_logprobs(task.logprobs, task.top_logprobs)


def check_message_count(n: int) -> None:
    """Also called by the HTTP front end before it builds the messages (or an Extract from them)."""
    if n > MAX_CHAT_MESSAGES:
        raise OutOfRange(
            f"messages has {n} entries; at most {MAX_CHAT_MESSAGES} are allowed "
            "(join consecutive turns into one message)"
        )


def _chat(task: ChatTask, limits: Limits) -> None:
    if not task.messages:
        raise InvalidRequest("messages is empty: send at least one user message")
    check_message_count(len(task.messages))
    for i, m in enumerate(task.messages):
        if m.role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role is {m.role!r}: use one of {', '.join(ROLES)}")
    if not any(m.content for m in task.messages):
        raise InvalidRequest("every message is empty: send some content")
    _max_tokens(task.max_tokens, limits)
    _sampling(task.sampling)
    check_logprobs(task.logprobs, task.top_logprobs)


def _classify(task: ClassifyTask, limits: Limits) -> None:
    if not task.text:
        raise InvalidRequest("text is empty: send the text to classify")
    n = len(task.labels)
    if n < 2:
        raise InvalidRequest(
            f"labels has {n} entr{'y' if n == 1 else 'ies'}: give at least 2 candidate labels"
        )
    if n > limits.max_labels:
        raise OutOfRange(
            f"labels has {n} entries; at most {limits.max_labels} are allowed (server.max_labels)"
        )
    seen: set[str] = set()
    for i, label in enumerate(task.labels):
        if not label.strip():
            raise InvalidRequest(f"labels[{i}] is empty: every label needs text")
        if len(label) > MAX_LABEL_CHARS:
            raise InvalidRequest(
                f"labels[{i}] is {len(label)} characters; at most {MAX_LABEL_CHARS}"
            )
        if label in seen:
            raise InvalidRequest(f"labels[{i}] {label!r} appears twice: labels must be distinct")
        seen.add(label)


def _extract(task: ExtractTask, limits: Limits) -> None:
    if not task.text:
        raise InvalidRequest("text is empty: send the text to extract from")
    _max_tokens(task.max_tokens, limits)
    if not task.schema:
        raise InvalidRequest("json_schema is empty: send a JSON Schema document")
    checked_schema(task.schema)


@functools.lru_cache(maxsize=32)  # callers send the same schema request after request
def checked_schema(text: str) -> dict[str, Any]:
    """The caller's schema, parsed, bounded (`schema_limits`) and checked against its
    metaschema; InvalidRequest saying what to fix otherwise. Shared: never modify it."""
    schema = bounded_schema(text)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise InvalidRequest(
            f"json_schema is not a valid JSON Schema at {where}: {e.message}"
        ) from None
    return schema


def _embed(task: EmbedTask, limits: Limits) -> None:
    n = len(task.texts)
    if n == 0:
        raise InvalidRequest("texts is empty: send at least one text to embed")
    if n > limits.max_embed_texts:
        raise OutOfRange(
            f"texts has {n} entries; at most {limits.max_embed_texts} (server.max_embed_texts)"
        )
    for i, t in enumerate(task.texts):
        if not t:
            raise InvalidRequest(f"texts[{i}] is empty")


CHECKS: dict[type, Callable[[Any, Limits], None]] = {
    GenerateTask: _generate,
    ChatTask: _chat,
    ClassifyTask: _classify,
    ExtractTask: _extract,
    EmbedTask: _embed,
}


def conforming_json(text: str, schema: str, seconds: float | None = None) -> str:
    """`text` re-serialised compactly if it is JSON the schema accepts; else SchemaViolation
    saying why. The one check every Extract answer passes, local or from the cloud.

    Both inputs are untrusted, so the check is bounded: answer size, nesting, RE2 for
    patterns (linear time), and a deadline (`seconds`, default VALIDATE_SECONDS) that every
    keyword checks before it runs."""
    document = checked_schema(schema)
    if len(text) > MAX_ANSWER_CHARS:
        raise SchemaViolation(
            f"the JSON is {len(text)} characters; at most {MAX_ANSWER_CHARS} are checked"
        )
    limit = VALIDATE_SECONDS if seconds is None else seconds
    token = _deadline.set(time.monotonic() + limit)
    try:
        value = json.loads(text)
        validator = _linear_validator(jsonschema.validators.validator_for(document))(document)
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        compact = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except ValueError as e:
        raise SchemaViolation(f"not valid JSON: {e}") from None
    except RecursionError:
        raise SchemaViolation("the JSON is nested too deeply to check") from None
    except referencing.exceptions.Unresolvable as e:
        raise InvalidRequest(f"json_schema has a $ref that does not resolve: {e}") from None
    except _TooSlow:
        raise SchemaViolation(
            f"the JSON could not be checked against the schema within {limit:g}s"
        ) from None
    finally:
        _deadline.reset(token)
    if error is not None:
        raise SchemaViolation(_short(error.message))
    return compact


async def conforming_json_async(text: str, schema: str) -> str:
    """`conforming_json` off the event loop: a schema and an answer crafted together can
    take seconds to check, and on the loop every other request (health checks too) would
    wait for it. The deadline ends the work in the thread; `wait_for` is the backstop."""
    try:
        return await asyncio.wait_for(
            asyncio.to_thread(conforming_json, text, schema), VALIDATE_SECONDS + 1.0
        )
    except asyncio.TimeoutError:  # not the builtin on 3.10
        raise SchemaViolation(
            f"the JSON could not be checked against the schema within {VALIDATE_SECONDS:g}s"
        ) from None


# ------------------------------------------------------------------ linear-time keywords
# jsonschema matches `pattern` and `patternProperties` with Python's backtracking `re`;
# these replacements use RE2 (the patterns were compiled by `schema_limits` already), and
# `uniqueItems` compares canonical forms in a set instead of every pair.

_deadline: contextvars.ContextVar[float] = contextvars.ContextVar(
    "sidecar_validate_deadline", default=math.inf
)


class _TooSlow(Exception):
    pass


def _search(pattern: str, text: str) -> bool:
    return compiled(pattern).search(text) is not None


def _pattern(v: Any, pattern: str, instance: Any, _schema: Any) -> Iterator[ValidationError]:
    if v.is_type(instance, "string") and not _search(pattern, instance):
        yield ValidationError(f"{_short(repr(instance))} does not match {pattern!r}")


def _pattern_properties(
    v: Any, patterns: dict[str, Any], instance: Any, _schema: Any
) -> Iterator[ValidationError]:
    if not v.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for k, value in instance.items():
            if _search(pattern, k):
                yield from v.descend(value, subschema, path=k, schema_path=pattern)


def _additional_properties(
    v: Any, extra_schema: Any, instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    if not v.is_type(instance, "object"):
        return
    known = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = [k for k in instance if k not in known and not any(_search(p, k) for p in patterns)]
    if v.is_type(extra_schema, "object"):
        for k in extras:
            yield from v.descend(instance[k], extra_schema, path=k)
    elif extra_schema is False and extras:
        names = ", ".join(repr(k) for k in sorted(extras))
        yield ValidationError(_short(f"additional properties are not allowed ({names})"))


def _unique_items(v: Any, unique: Any, instance: Any, _schema: Any) -> Iterator[ValidationError]:
    if not unique or not v.is_type(instance, "array"):
        return
    seen: set[Any] = set()
    for item in instance:
        key = _canonical(item)
        if key in seen:
            yield ValidationError(f"the array has non-unique elements ({_short(repr(item))})")
            return
        seen.add(key)


def _canonical(value: Any) -> Any:
    """A hashable form equal exactly when JSON Schema calls two values equal:
    1 == 1.0, true != 1, objects regardless of key order."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return ("array", tuple(_canonical(x) for x in value))
    if isinstance(value, dict):
        return ("object", frozenset((k, _canonical(x)) for k, x in value.items()))
    return value


_LINEAR = {
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
    "uniqueItems": _unique_items,
}


def _in_time(keyword: Callable[..., Any]) -> Callable[..., Any]:
    def run(v: Any, value: Any, instance: Any, schema: Any) -> Any:
        if time.monotonic() > _deadline.get():
            raise _TooSlow()
        return keyword(v, value, instance, schema)

    return run


@functools.lru_cache(maxsize=16)
def _linear_validator(base: Any) -> Any:
    """`base` (one validator class per draft) with linear-time keywords, each run only
    while the deadline has not passed."""
    keywords = {k: _LINEAR.get(k, fn) for k, fn in base.VALIDATORS.items()}
    timed = {k: _in_time(fn) for k, fn in keywords.items()}
    return jsonschema.validators.extend(base, timed)  # type: ignore[no-untyped-call]


def _short(message: str, limit: int = 300) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."
