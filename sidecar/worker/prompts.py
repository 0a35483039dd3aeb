"""The prompts behind Classify and Extract, and chat formatting for models without a template."""

from __future__ import annotations

from sidecar.types import ChatMessage

CLASSIFY_SYSTEM = (
    "You are a text classifier. Read the user's message and answer with exactly one "
    "label from this list, written exactly as shown and nothing else:\n{labels}"
)

EXTRACT_SYSTEM = (
    "Extract information from the user's text as JSON that follows this JSON Schema. "
    "Use only facts stated in the text.\nSchema: {schema}"
)


def classify_messages(text: str, labels: tuple[str, ...], instruction: str) -> tuple[ChatMessage, ...]:
    listing = "\n".join(f"- {label}" for label in labels)
    system = CLASSIFY_SYSTEM.format(labels=listing)
    if instruction:
        system = f"{instruction}\n\n{system}"
    return (ChatMessage("system", system), ChatMessage("user", text))


def extract_messages(text: str, schema: str, instruction: str) -> tuple[ChatMessage, ...]:
    system = EXTRACT_SYSTEM.format(schema=schema)
    if instruction:
        system = f"{instruction}\n\n{system}"
    return (ChatMessage("system", system), ChatMessage("user", text))


def chatml(messages: tuple[ChatMessage, ...]) -> str:
    """ChatML, for GGUF files that carry no chat template of their own."""
    turns = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"
