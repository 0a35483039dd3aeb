"""The request messages the clients send, built from plain Python arguments."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from sidecar.v1 import inference_pb2 as pb

# A chat message: ("user", "hi") or {"role": "user", "content": "hi"}.
Message = tuple[str, str] | Mapping[str, str]
# Where a request may be answered; "" = the daemon's default (cloud.routing).
Routing = Literal["", "AUTO", "LOCAL_ONLY", "CLOUD_ONLY", "auto", "local_only", "cloud_only"]
# How a swap replaces the old model; "" = the daemon's store.swap_strategy.
Strategy = Literal["", "side_by_side", "replace"]


def _sampling(
    temperature: float, top_p: float, top_k: int, seed: int, stop: Sequence[str]
) -> pb.Sampling:
    return pb.Sampling(
        temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=list(stop)
    )


def _routing(routing: str) -> pb.Routing.ValueType:
    """ "AUTO", "LOCAL_ONLY", "CLOUD_ONLY" (any case) or "" (the daemon's default)."""
    if not routing:
        return pb.ROUTING_UNSPECIFIED
    try:
        return pb.Routing.Value(f"ROUTING_{routing.upper()}")
    except ValueError:
        raise ValueError(
            f"routing must be AUTO, LOCAL_ONLY, CLOUD_ONLY or empty, not {routing!r}"
        ) from None


def _priority(low: bool) -> pb.Priority.ValueType:
    return pb.PRIORITY_LOW if low else pb.PRIORITY_UNSPECIFIED


def generate_request(prompt: str, *, model: str = "", max_tokens: int | None = None, temperature: float = 0.0,
                     top_p: float = 0.0, top_k: int = 0, seed: int = 0, stop: Sequence[str] = (),
                     routing: Routing = "", sensitive: bool = False, logprobs: bool = False,
                     top_logprobs: int = 0, low_priority: bool = False, adapter: str = "") -> pb.GenerateRequest:  # fmt: skip
    return pb.GenerateRequest(
        model=model, prompt=prompt, max_tokens=max_tokens,
        sampling=_sampling(temperature, top_p, top_k, seed, stop),
        routing=_routing(routing), sensitive=sensitive,
        logprobs=logprobs, top_logprobs=top_logprobs, priority=_priority(low_priority), adapter=adapter,
    )  # fmt: skip


def chat_request(messages: Iterable[Message], *, model: str = "", max_tokens: int | None = None, temperature: float = 0.0,
                 top_p: float = 0.0, top_k: int = 0, seed: int = 0, stop: Sequence[str] = (),
                 routing: Routing = "", sensitive: bool = False, logprobs: bool = False,
                 top_logprobs: int = 0, low_priority: bool = False, adapter: str = "") -> pb.ChatRequest:  # fmt: skip
    msgs = [
        pb.ChatMessage(role=m[0], content=m[1]) if isinstance(m, tuple)
        else pb.ChatMessage(role=m["role"], content=m["content"])
        for m in messages
    ]  # fmt: skip
    return pb.ChatRequest(
        model=model, messages=msgs, max_tokens=max_tokens,
        sampling=_sampling(temperature, top_p, top_k, seed, stop),
        routing=_routing(routing), sensitive=sensitive,
        logprobs=logprobs, top_logprobs=top_logprobs, priority=_priority(low_priority), adapter=adapter,
    )  # fmt: skip


def classify_request(
    text: str, labels: Sequence[str] = (), *, instruction: str = "", model: str = "",
    examples: Iterable[tuple[str, str]] = (), task: str = "", routing: Routing = "",
    sensitive: bool = False, allow_none: bool = False, low_priority: bool = False,
    adapter: str = "",
) -> pb.ClassifyRequest:  # fmt: skip
    return pb.ClassifyRequest(
        model=model, text=text, labels=list(labels), instruction=instruction,
        examples=[pb.Example(text=t, label=y) for t, y in examples], task=task,
        routing=_routing(routing), sensitive=sensitive, allow_none=allow_none,
        priority=_priority(low_priority), adapter=adapter,
    )  # fmt: skip


def extract_request(text: str, schema: str | Mapping[str, Any], *, instruction: str = "", model: str = "",
                    max_tokens: int | None = None, routing: Routing = "",
                    sensitive: bool = False, low_priority: bool = False,
                    adapter: str = "") -> pb.ExtractRequest:  # fmt: skip
    schema_text = schema if isinstance(schema, str) else json.dumps(schema)
    return pb.ExtractRequest(
        model=model, text=text, json_schema=schema_text, instruction=instruction,
        max_tokens=max_tokens, routing=_routing(routing), sensitive=sensitive,
        priority=_priority(low_priority), adapter=adapter,
    )  # fmt: skip


def embed_request(
    texts: Sequence[str], *, normalize: bool = False, model: str = ""
) -> pb.EmbedRequest:
    if isinstance(texts, str):  # a str is a Sequence[str] of its characters
        raise TypeError("texts must be a list of strings, not one string")
    return pb.EmbedRequest(model=model, texts=list(texts), normalize=normalize)


def swap_request(
    model: str = "", *, version: str = "", path: str | Path = "", strategy: Strategy = ""
) -> pb.SwapRequest:
    # The daemon opens the path: make it absolute here, where it was meant.
    where = str(Path(path).resolve()) if path else ""
    return pb.SwapRequest(model=model, version=version, path=where, strategy=strategy)


def add_model_request(path: str | Path, *, name: str, adapter_for: str = "") -> pb.AddModelRequest:
    return pb.AddModelRequest(model=name, path=str(Path(path).resolve()), adapter_for=adapter_for)
