"""OpenAI JSON -> domain tasks, and domain results -> OpenAI JSON (pure functions)."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest

from sidecar.domain.errors import InvalidRequest
from sidecar.domain.types import (
    ChatMessage,
    ChatTask,
    Embeddings,
    EmbedTask,
    ExtractTask,
    GenerateTask,
    Generation,
    ModelRef,
    TokenConfidence,
    Usage,
)
from sidecar.openai_api import wire

USER = [{"role": "user", "content": "hi"}]


def test_chat_defaults_to_greedy_and_the_server_token_default() -> None:
    p = wire.chat_request({"model": "m", "messages": USER})
    assert p.model == "m" and not p.stream
    assert isinstance(p.task, ChatTask)
    assert p.task.messages == (ChatMessage("user", "hi"),)
    assert p.task.max_tokens is None
    assert p.task.sampling.greedy


def test_chat_reads_sampling_stop_and_token_limits() -> None:
    p = wire.chat_request(
        {
            "messages": USER,
            "temperature": 1,  # an int is a valid JSON number
            "top_p": 0.5,
            "seed": 7,
            "stop": "\n",
            "max_tokens": 5,
            "max_completion_tokens": 9,  # the newer name wins
            "n": 1,
            "presence_penalty": 0,
            "logprobs": False,
            "tool_choice": "none",
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert isinstance(p.task, ChatTask)
    s = p.task.sampling
    assert (s.temperature, s.top_p, s.seed, s.stop) == (1.0, 0.5, 7, ("\n",))
    assert p.task.max_tokens == 9
    assert p.stream and p.include_usage


def test_developer_role_is_a_system_message_and_text_parts_are_joined() -> None:
    p = wire.chat_request(
        {
            "messages": [
                {"role": "developer", "content": "rules"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ]
        }
    )
    assert isinstance(p.task, ChatTask)
    assert p.task.messages == (ChatMessage("system", "rules"), ChatMessage("user", "ab"))


@pytest.mark.parametrize(
    ("fmt", "schema"),
    [
        ({"type": "json_object"}, {"type": "object"}),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array"}}},
            {"type": "array"},
        ),
    ],
)
def test_response_format_becomes_extract(fmt: dict[str, Any], schema: dict[str, Any]) -> None:
    messages = [
        {"role": "system", "content": "Pull the fields."},
        {"role": "user", "content": "Invoice 7"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "total 5"},
    ]
    p = wire.chat_request({"messages": messages, "response_format": fmt, "max_tokens": 50})
    assert isinstance(p.task, ExtractTask)
    assert json.loads(p.task.schema) == schema
    assert p.task.instruction == "Pull the fields."
    assert p.task.text == "Invoice 7\n\nok\n\ntotal 5"
    assert p.task.max_tokens == 50
    plain = wire.chat_request({"messages": USER, "response_format": {"type": "text"}})
    assert isinstance(plain.task, ChatTask)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("not an object", "must be a JSON object"),
        ({}, "'messages' is required"),
        ({"messages": "hi"}, "'messages' must be an array"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages\\[0\\].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages\\[0\\].content"),
        ({"messages": USER, "n": 3}, "'n' is not supported"),
        ({"messages": USER, "tools": [{}]}, "tool calling"),
        ({"messages": USER, "tool_choice": "auto"}, "tool calling"),
        ({"messages": USER, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": USER, "frequency_penalty": 1}, "frequency_penalty"),
        ({"messages": USER, "logit_bias": {"1": 5}}, "logit_bias"),
        ({"messages": USER, "temperature": "hot"}, "'temperature' must be a number, got str"),
        ({"messages": USER, "max_tokens": True}, "'max_tokens' must be an integer, got a boolean"),
        ({"messages": USER, "stop": [1]}, "'stop' must be a string or an array of strings"),
        ({"messages": USER, "response_format": {"type": "json_schema"}}, "schema' is required"),
        ({"messages": USER, "stream_options": {"include_usage": True}}, "only allowed with"),
        (
            {"messages": [{"role": "assistant", "content": "", "tool_calls": [{}]}]},
            "tool_calls",
        ),
    ],
)
def test_bad_chat_bodies_name_the_parameter(body: object, match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        wire.chat_request(body)


def test_completion_accepts_a_string_or_a_list_of_one() -> None:
    for prompt in ("The sky", ["The sky"]):
        p = wire.completion_request({"prompt": prompt, "max_tokens": 3})
        assert isinstance(p.task, GenerateTask)
        assert (p.task.prompt, p.task.max_tokens) == ("The sky", 3)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({}, "'prompt' is required"),
        ({"prompt": ["a", "b"]}, "exactly one string"),
        ({"prompt": [[1, 2]]}, "token arrays"),
        ({"prompt": "x", "echo": True}, "'echo' is not supported"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
    ],
)
def test_bad_completion_bodies_name_the_parameter(body: object, match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        wire.completion_request(body)


def test_embeddings_are_normalised_and_accept_one_or_many() -> None:
    one = wire.embedding_request({"input": "a"})
    many = wire.embedding_request({"input": ["a", "b"], "encoding_format": "base64"})
    assert one.task == EmbedTask(texts=("a",), normalize=True)
    assert isinstance(many.task, EmbedTask) and many.task.texts == ("a", "b")
    assert (one.encoding, many.encoding) == ("float", "base64")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({}, "'input' is required"),
        ({"input": []}, "non-empty"),
        ({"input": [1, 2]}, "token arrays"),
        ({"input": "a", "encoding_format": "hex"}, "encoding_format"),
    ],
)
def test_bad_embedding_bodies_name_the_parameter(body: object, match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        wire.embedding_request(body)


def _generation() -> Generation:
    return Generation(
        text="Paris",
        finish_reason="stop",
        usage=Usage(5, 2),
        confidence=TokenConfidence(-0.1, -0.3),
        model=ModelRef("demo", "abc123def456"),
    )


def test_chat_reply_has_the_openai_shape_and_says_who_answered() -> None:
    out = wire.Reply("rid1", "demo").chat(_generation())
    assert out["id"] == "chatcmpl-rid1" and out["object"] == "chat.completion"
    assert out["model"] == "demo" and out["system_fingerprint"] == "demo@abc123def456"
    assert out["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Paris"},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ]
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert out["sidecar"]["served_by"] == "local"
    assert out["sidecar"]["confidence"] == {"mean_logprob": -0.1, "min_logprob": -0.3}


def test_base64_embeddings_decode_to_the_float_values() -> None:
    result = Embeddings(vectors=[[0.5, -0.25, 1.0]], usage=Usage(3, 0), model=ModelRef("e", "v"))
    reply = wire.Reply("r", "e")
    b64 = reply.embeddings(result, "base64", None)["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(b64), dtype="<f4")
    assert decoded.tolist() == [0.5, -0.25, 1.0]
    assert reply.embeddings(result, "float", 3)["data"][0]["embedding"] == [0.5, -0.25, 1.0]
    with pytest.raises(InvalidRequest, match="dimensions' is 4 but this model's embeddings have 3"):
        reply.embeddings(result, "float", 4)
