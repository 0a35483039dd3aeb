"""The prompts behind Classify and Extract, and chat formatting for models without a template."""

from __future__ import annotations

import json
from typing import Any

from sidecar.domain.types import ChatMessage

CLASSIFY_SYSTEM = (
    "You are a text classifier. Read the user's message and answer with exactly one "
    "label from this list, written exactly as shown and nothing else:\n{labels}"
)

# Small models follow a plain list of fields far better than a raw JSON Schema
# (measured with SmolLM2-135M: the raw schema made it loop inside a string).
EXTRACT_FIELDS = "Extract these fields from the user's text and answer in JSON:\n{fields}"
EXTRACT_SCHEMA = (
    "Extract information from the user's text as JSON following this JSON Schema:\n{schema}"
)


def classify_messages(
    text: str, labels: tuple[str, ...], instruction: str
) -> tuple[ChatMessage, ...]:
    listing = "\n".join(f"- {label}" for label in labels)
    system = CLASSIFY_SYSTEM.format(labels=listing)
    if instruction:
        system = f"{instruction}\n\n{system}"
    return (ChatMessage("system", system), ChatMessage("user", text))


def describe_field(spec: Any) -> str:
    if not isinstance(spec, dict):
        return "any value"
    if "enum" in spec:
        return "one of: " + ", ".join(str(v) for v in spec["enum"])
    kind = spec.get("type", "value")
    if kind == "array" and isinstance(spec.get("items"), dict):
        kind = f"list of {describe_field(spec['items'])}"
    elif isinstance(kind, list):
        kind = " or ".join(map(str, kind))
    note = spec.get("description")
    return f"{kind}, {note}" if note else str(kind)


def extract_messages(text: str, schema: str, instruction: str) -> tuple[ChatMessage, ...]:
    parsed = json.loads(schema)
    props = parsed.get("properties") if isinstance(parsed, dict) else None
    if isinstance(props, dict) and props:
        fields = "\n".join(f"- {name} ({describe_field(spec)})" for name, spec in props.items())
        system = EXTRACT_FIELDS.format(fields=fields)
    else:
        system = EXTRACT_SCHEMA.format(schema=schema)
    if instruction:
        system = f"{instruction}\n\n{system}"
    return (ChatMessage("system", system), ChatMessage("user", text))


def chatml(messages: tuple[ChatMessage, ...]) -> str:
    """ChatML, for GGUF files that carry no chat template of their own."""
    turns = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"
