"""Checks on a request before it waits for a worker, so bad input fails fast and cheap.

What needs the tokenizer (does the prompt fit the context?) is checked by the worker.
Every message says what to change.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jsonschema

from sidecar.errors import ContextOverflow, InvalidRequest, OutOfRange, SchemaViolation
from sidecar.types import (
    ChatTask,
    ClassifyTask,
    EmbedTask,
    ExtractTask,
    GenerateTask,
    Sampling,
    Task,
)

ROLES = ("system", "user", "assistant")
MAX_STOP_SEQUENCES = 8
MAX_LABEL_CHARS = 200


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


def _generate(task: GenerateTask, limits: Limits) -> None:
    if not task.prompt:
        raise InvalidRequest("prompt is empty: send the text to continue")
    _max_tokens(task.max_tokens, limits)
    _sampling(task.sampling)


def _chat(task: ChatTask, limits: Limits) -> None:
    if not task.messages:
        raise InvalidRequest("messages is empty: send at least one user message")
    for i, m in enumerate(task.messages):
        if m.role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role is {m.role!r}: use one of {', '.join(ROLES)}")
    if not any(m.content for m in task.messages):
        raise InvalidRequest("every message is empty: send some content")
    _max_tokens(task.max_tokens, limits)
    _sampling(task.sampling)


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
    try:
        schema = json.loads(task.schema)
    except ValueError as e:
        raise InvalidRequest(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise InvalidRequest("json_schema must be a JSON object (a JSON Schema document)")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise InvalidRequest(
            f"json_schema is not a valid JSON Schema at {where}: {e.message}"
        ) from None


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


def conforming_json(text: str, schema: str) -> str:
    """`text` re-serialised compactly if it is JSON the schema accepts; else SchemaViolation
    saying why. The one check every Extract answer passes, local or from the cloud."""
    try:
        value = json.loads(text)
        jsonschema.validate(value, json.loads(schema))
    except (ValueError, jsonschema.ValidationError) as e:
        raise SchemaViolation(str(getattr(e, "message", e))) from None
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
