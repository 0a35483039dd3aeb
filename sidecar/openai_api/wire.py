"""OpenAI wire JSON <-> domain: the only module that knows the OpenAI request and reply shapes.

Requests become the same domain tasks gRPC builds, so both front ends share validation,
scheduling and every later stage. Differences from OpenAI, all deliberate:
- `temperature` defaults to 0 (greedy, reproducible), not 1: determinism is the point.
- `response_format` (json_schema or json_object) runs Extract's grammar-constrained decoding;
  system/developer messages become its instruction, the other turns its text.
- Embeddings are L2-normalised, as OpenAI's are.
- What would silently change the meaning of a request (n > 1, tools, penalties, logit_bias,
  echo, suffix, logprobs with response_format) is refused with 400 naming the parameter,
  never ignored.
- Log-probabilities are those of the model's own distribution (log-softmax of its logits,
  before temperature, penalties or a grammar); a cloud-served reply has none (empty lists).
  The legacy completions' `text_offset` counts from the start of the prompt, as without
  `echo` in OpenAI's and llama.cpp's servers.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sidecar.domain.errors import InvalidRequest
from sidecar.domain.names import split_adapter
from sidecar.domain.seam import DEFAULT_ROUTE  # the daemon's configured routing
from sidecar.domain.types import (
    ChatMessage,
    ChatTask,
    Embeddings,
    EmbedTask,
    Extraction,
    ExtractTask,
    GenerateTask,
    Generation,
    ModelRef,
    RouteInfo,
    RouteRequest,
    Sampling,
    Timings,
    TokenConfidence,
    TokenLogprob,
    Usage,
)
from sidecar.validate import check_logprobs, check_message_count

MAX_LEGACY_LOGPROBS = 5  # /v1/completions' `logprobs: N`, as OpenAI

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
INSTRUCTION_ROLES = ("system",)
ANY_OBJECT_SCHEMA = json.dumps({"type": "object"})

Json = dict[str, Any]


@dataclass(frozen=True)
class Parsed:
    model: str
    task: GenerateTask | ChatTask | ExtractTask | EmbedTask
    stream: bool = False
    include_usage: bool = False
    encoding: str = "float"  # embeddings only
    dimensions: int | None = None  # embeddings only
    route: RouteRequest = DEFAULT_ROUTE


# ---------------------------------------------------------------- parsing the body

# Room for a response_format schema at its own bound (64 levels, see schema_limits) plus
# the request's levels around it, and far below Python's recursion limit, which the JSON
# decoder and every tool after it (json.dumps, jsonschema, the grammar converter) would
# otherwise hit with a RecursionError (a 500).
MAX_JSON_DEPTH = 100
# A JSON escape of a UTF-16 surrogate; only a lone one survives decoding as a surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_body(data: bytes) -> object:
    """The request body as JSON, refused (400) when it is not JSON, nests too deep or holds
    text that is not Unicode (a lone surrogate cannot be UTF-8 encoded for the model)."""
    try:
        # Strict UTF-8 first: json.loads(bytes) would let an encoded lone surrogate
        # (b"\xed\xa0\x80") through as text the model cannot take.
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"the body is not valid UTF-8: {e}") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise InvalidRequest(_too_deep()) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"the body is not valid JSON: {e}") from None
    _check_depth(value)
    if _SURROGATE_ESCAPE.search(data):
        _check_surrogates(value)
    return value


def _too_deep() -> str:
    return f"the body is nested too deeply: arrays and objects may nest at most {MAX_JSON_DEPTH} levels"


def _check_depth(value: object) -> None:
    """Level by level, without recursion (40 ms for 100k messages)."""
    level: list[Any] = [value] if isinstance(value, dict | list) else []
    depth = 1
    while level:
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(_too_deep())
        below: list[Any] = []
        add = below.append
        for node in level:
            for child in node.values() if type(node) is dict else node:
                kind = type(child)
                if kind is dict or kind is list:
                    add(child)
        level, depth = below, depth + 1


def _check_surrogates(value: object) -> None:
    """Name the first string (or key) holding a lone surrogate."""
    stack: list[tuple[object, str]] = [(value, "")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, str):
            _encodable(node, where)
        elif isinstance(node, dict):
            for key, child in node.items():
                _encodable(key, f"{where} (a key)" if where else "a key")
                stack.append((child, f"{where}.{key}" if where else key))
        elif isinstance(node, list):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(node))


def _encodable(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        where = where if len(where) <= 120 else where[:120] + "..."
        raise InvalidRequest(
            f"{where!a} holds a lone UTF-16 surrogate ({text[e.start]!r} at character "
            f"{e.start}), which is not text: send valid Unicode"
        ) from None


# ---------------------------------------------------------------- reading fields


class Body:
    """Typed access to a JSON object; every failure names the parameter."""

    def __init__(self, raw: object, where: str = "") -> None:
        if not isinstance(raw, dict):
            raise InvalidRequest(f"{where or 'the request body'} must be a JSON object")
        self.raw: Mapping[str, Any] = raw
        self.where = where

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = self.raw.get(key)
        if value is None:
            return default
        # JSON has one number type: accept 1 for a float, refuse true for an int.
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, bool) and kind is not bool:
            raise InvalidRequest(f"'{self.name(key)}' must be {_kind(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise InvalidRequest(
                f"'{self.name(key)}' must be {_kind(kind)}, got {type(value).__name__}"
            )
        return value

    def refuse(self, key: str, allowed: Any, why: str) -> None:
        """A parameter whose only supported value is `allowed` (or absent)."""
        value = self.raw.get(key)
        if value is not None and value != allowed and value not in ([], {}):
            raise InvalidRequest(f"'{self.name(key)}' is not supported: {why}")


def _kind(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}
    names |= {list: "an array", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _model(body: Body) -> str:
    return str(body.get("model", str, ""))


def _model_and_adapter(body: Body) -> tuple[str, str]:
    """ "NAME:ADAPTER" names a LoRA adapter of model NAME (an unknown one is a 404)."""
    model = _model(body)
    return split_adapter(model) or (model, "")


def _route(body: Body) -> RouteRequest:
    """sidecar's own routing parameters (the SDKs pass them with `extra_body`)."""
    routing = body.get("sidecar_routing", str, "")
    if routing not in ("", "AUTO", "LOCAL_ONLY", "CLOUD_ONLY"):
        raise InvalidRequest(
            f"'sidecar_routing' must be AUTO, LOCAL_ONLY or CLOUD_ONLY, got {routing!r}"
        )
    return RouteRequest(routing, bool(body.get("sidecar_sensitive", bool, False)))


def _max_tokens(body: Body) -> int | None:
    value: int | None = body.get("max_completion_tokens", int)
    if value is None:
        value = body.get("max_tokens", int)
    return value or None  # 0 = the server default, as over gRPC


def _stop(body: Body) -> tuple[str, ...]:
    stop = body.get("stop", (str, list))
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in items):
        raise InvalidRequest("'stop' must be a string or an array of strings")
    return tuple(items)


def _sampling(body: Body) -> Sampling:
    body.refuse("n", 1, "one choice per request (send separate requests)")
    body.refuse("presence_penalty", 0, "use a repeat penalty via gRPC Sampling instead")
    body.refuse("frequency_penalty", 0, "use a repeat penalty via gRPC Sampling instead")
    body.refuse("logit_bias", None, "logit bias is not supported")
    return Sampling(
        temperature=body.get("temperature", float, 0.0),
        top_p=body.get("top_p", float, 1.0),
        seed=body.get("seed", int, 0),
        stop=_stop(body),
    )


def _chat_logprobs(body: Body) -> tuple[bool, int]:
    logprobs = bool(body.get("logprobs", bool, False))
    top = body.get("top_logprobs", int, 0)
    check_logprobs(logprobs, top)
    return logprobs, top


def _legacy_logprobs(body: Body) -> tuple[bool, int]:
    """/v1/completions: `logprobs: N` asks for the tokens' log-probabilities and N alternatives."""
    body.refuse("top_logprobs", None, "on /v1/completions pass 'logprobs': N (0-5) instead")
    n = body.get("logprobs", int)
    if n is None:
        return False, 0
    if not 0 <= n <= MAX_LEGACY_LOGPROBS:
        raise InvalidRequest(f"'logprobs' must be between 0 and {MAX_LEGACY_LOGPROBS}, got {n}")
    return True, n


def _stream(body: Body) -> tuple[bool, bool]:
    stream = bool(body.get("stream", bool, False))
    options = body.get("stream_options", dict)
    include_usage = (
        bool(Body(options, "stream_options").get("include_usage", bool, False))
        if options
        else False
    )
    if options and not stream:
        raise InvalidRequest("'stream_options' is only allowed with 'stream': true")
    return stream, include_usage


# ---------------------------------------------------------------- requests


def _content(message: Body) -> str:
    content = message.raw.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise InvalidRequest(f"'{message.name('content')}' must be a string or an array of parts")
    texts = []
    for i, part in enumerate(content):
        p = Body(part, message.name(f"content[{i}]"))
        if p.get("type", str) != "text":
            raise InvalidRequest(f"'{p.name('type')}' must be 'text': this model reads text only")
        texts.append(p.get("text", str, ""))
    return "".join(texts)


def _messages(body: Body) -> tuple[ChatMessage, ...]:
    raw = body.get("messages", list)
    if not raw:
        raise InvalidRequest("'messages' is required: a non-empty array of {role, content}")
    check_message_count(len(raw))
    out = []
    for i, item in enumerate(raw):
        m = Body(item, f"messages[{i}]")
        role = m.get("role", str, "")
        if role not in ROLES:
            raise InvalidRequest(
                f"'{m.name('role')}' must be one of {', '.join(ROLES)}, got {role!r}"
                + (" (tool calling is not supported)" if role in ("tool", "function") else "")
            )
        if m.raw.get("tool_calls"):
            raise InvalidRequest(f"'{m.name('tool_calls')}' is not supported")
        out.append(ChatMessage(ROLES[role], _content(m)))
    return tuple(out)


def _response_schema(body: Body) -> str | None:
    """The JSON Schema `response_format` asks for, or None for plain text."""
    fmt = body.get("response_format", dict)
    if fmt is None:
        return None
    f = Body(fmt, "response_format")
    kind = f.get("type", str, "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT_SCHEMA
    if kind == "json_schema":
        spec = Body(f.get("json_schema", dict) or {}, "response_format.json_schema")
        schema = spec.get("schema", dict)
        if schema is None:
            raise InvalidRequest("'response_format.json_schema.schema' is required")
        return json.dumps(schema)
    raise InvalidRequest(
        f"'response_format.type' must be text, json_object or json_schema, got {kind!r}"
    )


def chat_request(raw: object) -> Parsed:
    body = Body(raw)
    for key in ("tools", "functions"):
        body.refuse(key, None, "tool calling is not supported")
    body.refuse("tool_choice", "none", "tool calling is not supported")
    messages = _messages(body)
    sampling = _sampling(body)
    stream, include_usage = _stream(body)
    schema = _response_schema(body)
    logprobs, top = _chat_logprobs(body)
    task: ChatTask | ExtractTask
    model, adapter = _model_and_adapter(body)
    if schema is None:
        task = ChatTask(
            messages=messages,
            max_tokens=_max_tokens(body),
            sampling=sampling,
            logprobs=logprobs,
            top_logprobs=top,
            adapter=adapter,
        )
    else:
        if logprobs:
            # Extract's reply is re-serialised JSON checked against the schema, not the
            # tokens the model produced, so their log-probabilities would not match it.
            raise InvalidRequest("'logprobs' is not supported with 'response_format'")
        task = ExtractTask(
            text="\n\n".join(m.content for m in messages if m.role not in INSTRUCTION_ROLES),
            schema=schema,
            instruction="\n\n".join(m.content for m in messages if m.role in INSTRUCTION_ROLES),
            max_tokens=_max_tokens(body),
            adapter=adapter,
        )
    return Parsed(model, task, stream, include_usage, route=_route(body))


def completion_request(raw: object) -> Parsed:
    body = Body(raw)
    body.refuse("echo", False, "the prompt is not echoed")
    body.refuse("suffix", None, "insertion (suffix) is not supported")
    body.refuse("best_of", 1, "one candidate per request")
    prompt = body.get("prompt", (str, list))
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise InvalidRequest(
                "'prompt' must be a string or an array of exactly one string "
                "(send one request per prompt; token arrays are not supported)"
            )
        prompt = prompt[0]
    if prompt is None:
        raise InvalidRequest("'prompt' is required")
    sampling = _sampling(body)
    stream, include_usage = _stream(body)
    logprobs, top = _legacy_logprobs(body)
    model, adapter = _model_and_adapter(body)
    task = GenerateTask(
        prompt=prompt,
        max_tokens=_max_tokens(body),
        sampling=sampling,
        logprobs=logprobs,
        top_logprobs=top,
        adapter=adapter,
    )
    return Parsed(model, task, stream, include_usage, route=_route(body))


def embedding_request(raw: object) -> Parsed:
    body = Body(raw)
    given = body.get("input", (str, list))
    if given is None:
        raise InvalidRequest("'input' is required: a string or an array of strings")
    texts = [given] if isinstance(given, str) else given
    if not texts or not all(isinstance(t, str) for t in texts):
        raise InvalidRequest(
            "'input' must be a string or a non-empty array of strings (token arrays are not supported)"
        )
    encoding = body.get("encoding_format", str, "float")
    if encoding not in ("float", "base64"):
        raise InvalidRequest(f"'encoding_format' must be float or base64, got {encoding!r}")
    dimensions = body.get("dimensions", int)
    model, adapter = _model_and_adapter(body)
    if adapter:
        raise InvalidRequest(
            f"embeddings take no adapter: send model {model!r} without ':{adapter}'"
        )
    return Parsed(
        model,
        EmbedTask(texts=tuple(texts), normalize=True),
        encoding=encoding,
        dimensions=dimensions,
    )


# ---------------------------------------------------------------- replies


def _usage(u: Usage) -> Json:
    total = u.prompt_tokens + u.completion_tokens
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": total,
    }


def _extension(
    ref: ModelRef | None,
    timings: Timings,
    confidence: TokenConfidence | None,
    route: RouteInfo | None = None,
    adapter: ModelRef | None = None,
) -> Json:
    """What OpenAI's shape has no field for; clients that do not know it ignore it."""
    route = route or RouteInfo()
    out: Json = {
        "served_by": route.served_by,
        "route": {
            "reason": route.reason,
            "reason_code": route.code,
            "local_confidence": route.local_confidence,
            "cloud_latency_ms": round(route.cloud_latency_ms, 3),
            "cost": route.cost,
        },
        "model_version": ref.version if ref else "",
        "adapter_version": adapter.version if adapter else "",
        "timings": {
            "queue_ms": round(timings.queue_ms, 3),
            "first_token_ms": round(timings.first_token_ms, 3),
            "total_ms": round(timings.total_ms, 3),
        },
    }
    if confidence is not None:
        out["confidence"] = {
            "mean_logprob": confidence.mean_logprob,
            "min_logprob": confidence.min_logprob,
        }
    return out


def _chat_logprobs_json(items: tuple[TokenLogprob, ...]) -> Json:
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": list(t.bytes),
                "top_logprobs": [
                    {"token": a.token, "logprob": a.logprob, "bytes": list(a.bytes)} for a in t.top
                ],
            }
            for t in items
        ],
        "refusal": None,
    }


def _fingerprint(ref: ModelRef | None) -> str:
    return f"{ref.name}@{ref.version}" if ref else ""


class Reply:
    """The envelope every reply of one request shares (id, created, model)."""

    def __init__(
        self,
        rid: str,
        model: str,
        *,
        logprobs: bool = False,
        text_offset: int = 0,
        adapter: str = "",
    ) -> None:
        self.rid = rid
        self.model = model
        self.adapter = adapter  # echoed as model "NAME:ADAPTER", as it was asked for
        self.created = int(time.time())
        self.logprobs = logprobs  # the request asked for them
        self._offset = text_offset  # legacy completions: where the next token's text starts

    def _legacy_logprobs(self, items: tuple[TokenLogprob, ...]) -> Json:
        offsets = []
        for t in items:
            offsets.append(self._offset)
            self._offset += len(t.token)
        return {
            "tokens": [t.token for t in items],
            "token_logprobs": [t.logprob for t in items],
            "top_logprobs": [{a.token: a.logprob for a in t.top} for t in items],
            "text_offset": offsets,
        }

    def _head(self, prefix: str, obj: str, ref: ModelRef | None) -> Json:
        return {
            "id": f"{prefix}-{self.rid}",
            "object": obj,
            "created": self.created,
            "model": (ref.name if ref else self.model)
            + (f":{self.adapter}" if self.adapter else ""),
            "system_fingerprint": _fingerprint(ref),
        }

    def chat(self, result: Generation | Extraction) -> Json:
        text, finish = (
            (result.text, result.finish_reason)
            if isinstance(result, Generation)
            else (result.json, "stop")
        )
        return self._head("chatcmpl", "chat.completion", result.model) | {
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                    "logprobs": (
                        _chat_logprobs_json(result.logprobs)
                        if self.logprobs and isinstance(result, Generation)
                        else None
                    ),
                }
            ],
            "usage": _usage(result.usage),
            "sidecar": _extension(
                result.model, result.timings, result.confidence, result.route, result.adapter
            ),
        }

    def chat_chunk(
        self,
        delta: Json,
        finish: str | None = None,
        ref: ModelRef | None = None,
        logprobs: tuple[TokenLogprob, ...] | None = None,
    ) -> Json:
        """`logprobs`: those of the tokens whose text `delta` carries (None: not a text chunk)."""
        lp = _chat_logprobs_json(logprobs) if self.logprobs and logprobs is not None else None
        return self._head("chatcmpl", "chat.completion.chunk", ref) | {
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": lp}]
        }

    def completion(self, result: Generation) -> Json:
        return self._head("cmpl", "text_completion", result.model) | {
            "choices": [
                {
                    "index": 0,
                    "text": result.text,
                    "finish_reason": result.finish_reason,
                    "logprobs": self._legacy_logprobs(result.logprobs) if self.logprobs else None,
                }
            ],
            "usage": _usage(result.usage),
            "sidecar": _extension(
                result.model, result.timings, result.confidence, result.route, result.adapter
            ),
        }

    def completion_chunk(
        self,
        text: str,
        finish: str | None = None,
        ref: ModelRef | None = None,
        logprobs: tuple[TokenLogprob, ...] | None = None,
    ) -> Json:
        lp = self._legacy_logprobs(logprobs) if self.logprobs and logprobs is not None else None
        return self._head("cmpl", "text_completion", ref) | {
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": lp}]
        }

    def usage_chunk(self, kind: str, result: Generation | Extraction) -> Json:
        """The extra last chunk `stream_options.include_usage` asks for: no choices."""
        prefix, obj = (
            ("chatcmpl", "chat.completion.chunk")
            if kind == "chat"
            else (
                "cmpl",
                "text_completion",
            )
        )
        return self._head(prefix, obj, result.model) | {
            "choices": [],
            "usage": _usage(result.usage),
            "sidecar": _extension(
                result.model, result.timings, result.confidence, result.route, result.adapter
            ),
        }

    def embeddings(self, result: Embeddings, encoding: str, dimensions: int | None) -> Json:
        size = len(result.vectors[0]) if result.vectors else 0
        if dimensions is not None and dimensions != size:
            raise InvalidRequest(
                f"'dimensions' is {dimensions} but this model's embeddings have {size} "
                "(leave it out, or pass the model's size)"
            )

        def encode(v: list[float]) -> list[float] | str:
            if encoding == "base64":  # what the OpenAI SDKs ask for by default
                return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
            return v

        return {
            "object": "list",
            "model": result.model.name if result.model else self.model,
            "data": [
                {"object": "embedding", "index": i, "embedding": encode(v)}
                for i, v in enumerate(result.vectors)
            ],
            "usage": {
                "prompt_tokens": result.usage.prompt_tokens,
                "total_tokens": result.usage.prompt_tokens,
            },
            "sidecar": _extension(result.model, result.timings, None),
        }


def model_list(names: list[str]) -> Json:
    return {"object": "list", "data": [model_entry(n) for n in names]}


def model_entry(name: str) -> Json:
    return {"id": name, "object": "model", "created": 0, "owned_by": "sidecar"}
