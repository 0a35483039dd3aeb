from __future__ import annotations

import json

import pytest

from sidecar.domain.errors import InvalidRequest, OutOfRange
from sidecar.domain.types import (
    ChatMessage,
    ChatTask,
    ClassifyTask,
    EmbedTask,
    ExtractTask,
    GenerateTask,
    Sampling,
    Task,
)
from sidecar.validate import Limits, check

LIMITS = Limits(context=2048, max_labels=256, max_embed_texts=16)
SCHEMA = json.dumps({"type": "object", "properties": {"a": {"type": "string"}}})


@pytest.mark.parametrize(
    ("task", "error", "says"),
    [
        (GenerateTask("", 10), InvalidRequest, "prompt is empty"),
        (GenerateTask("hi", -1), InvalidRequest, "max_tokens must be at least 1"),
        (GenerateTask("hi", 0), InvalidRequest, "leave it unset"),
        (ExtractTask("t", SCHEMA, max_tokens=0), InvalidRequest, "max_tokens"),
        (GenerateTask("hi", 10**9), OutOfRange, "context window"),
        (GenerateTask("hi", 5, Sampling(temperature=-1)), InvalidRequest, "temperature"),
        (GenerateTask("hi", 5, Sampling(top_p=2)), InvalidRequest, "top_p"),
        (GenerateTask("hi", 5, Sampling(stop=("",))), InvalidRequest, "stop"),
        (ChatTask((), 5), InvalidRequest, "messages is empty"),
        (ChatTask((ChatMessage("robot", "x"),), 5), InvalidRequest, "role"),
        (ChatTask((ChatMessage("user", ""),), 5), InvalidRequest, "empty"),
        (ClassifyTask("", ("a", "b")), InvalidRequest, "text is empty"),
        (ClassifyTask("t", ()), InvalidRequest, "at least 2"),
        (ClassifyTask("t", ("a",)), InvalidRequest, "at least 2"),
        (ClassifyTask("t", ("a", "")), InvalidRequest, "labels[1] is empty"),
        (ClassifyTask("t", ("a", "b", "a")), InvalidRequest, "appears twice"),
        (ClassifyTask("t", tuple(f"l{i}" for i in range(3000))), OutOfRange, "at most 256"),
        (ClassifyTask("t", ("a", "x" * 500)), InvalidRequest, "characters"),
        (ExtractTask("t", ""), InvalidRequest, "json_schema is empty"),
        (ExtractTask("t", "{not json"), InvalidRequest, "not valid JSON"),
        (ExtractTask("t", "[1, 2]"), InvalidRequest, "JSON object"),
        (ExtractTask("t", '{"type": "objekt"}'), InvalidRequest, "not a valid JSON Schema"),
        (
            ExtractTask("t", '{"properties": {"a": {"type": 5}}}'),
            InvalidRequest,
            "properties/a/type",
        ),
        (ExtractTask("", SCHEMA), InvalidRequest, "text is empty"),
        (EmbedTask(()), InvalidRequest, "texts is empty"),
        (EmbedTask(("a", "")), InvalidRequest, "texts[1] is empty"),
        (EmbedTask(tuple("x" * 17)), OutOfRange, "at most 16"),
    ],
)
def test_bad_input_is_refused_with_a_message_that_says_what_to_fix(
    task: Task, error: type[Exception], says: str
) -> None:
    with pytest.raises(error) as e:
        check(task, LIMITS)
    assert says in str(e.value)


@pytest.mark.parametrize(
    "task",
    [
        GenerateTask("hi", None),
        GenerateTask("hi", 2048, Sampling(temperature=0.7, top_p=0.9, top_k=40, stop=("\n",))),
        ChatTask((ChatMessage("system", ""), ChatMessage("user", "hi")), None),
        ClassifyTask("t", ("a", "b")),
        ExtractTask("t", SCHEMA),
        EmbedTask(("a", "b")),
    ],
)
def test_good_input_passes(task: Task) -> None:
    check(task, LIMITS)
