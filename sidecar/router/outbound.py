"""What an escalation sends, built whole before anything is sent, and the gate it passes.

`build` turns a task into the exact request the cloud gets: the messages (for Classify
the prompt that lists the labels, for Extract the system prompt that carries the
schema) and the schema for `response_format`. `Gate` reads every string of it as one
text: message contents, labels, every key, string and number of the schema. Nothing
leaves because of the field it came in, and a value split across two messages (or the
system and user message) is still found, because the parts are scanned concatenated.

The gate runs twice: on the built request's parts for the routing decision (and the
redaction, which keeps the labels apart so a redacted label maps back to the caller's
label), and once more in the cloud client on the final payload, right before it is
sent: anything found there is redacted (redaction on) or the call is refused.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from sidecar.domain.types import (
    ChatMessage,
    ChatTask,
    ClassifyTask,
    ExtractTask,
    GenerateTask,
    Task,
)
from sidecar.router.privacy import Scanner

RETRY_LABEL = "Answer with exactly one label from the list, nothing else."
# With allow_none the cloud gets the same way out as the local answer: "none of these".
NONE_ANSWER = "none of these"
RETRY_LABEL_OR_NONE = (
    f"Answer with exactly one label from the list, or {NONE_ANSWER}, nothing else."
)
CLASSIFY_MAX_TOKENS = 32
# What a call without max_tokens is assumed to produce, for the budget's reservation.
DEFAULT_COMPLETION_TOKENS = 1024
# Scanning costs 0.1-0.3 ms per KB of prose, but up to ~10 ms per KB of text packed with
# phone-like digit runs: past this many characters it runs in a thread,
# so a big request does not stall every other one on the event loop.
OFF_LOOP_CHARS = 2_048


class SensitiveData(Exception):
    """The final check found personal data in a payload about to leave, with redaction
    off: nothing was sent."""

    def __init__(self, kinds: Sequence[str]) -> None:
        self.kinds = tuple(kinds)
        super().__init__(f"sensitive data ({', '.join(self.kinds)}) never leaves the machine")


@dataclass(frozen=True)
class Outbound:
    kind: Literal["chat", "classify", "extract"]
    messages: tuple[ChatMessage, ...] = ()  # chat: the conversation as sent
    text: str = ""
    instruction: str = ""
    labels: tuple[str, ...] = ()  # as listed in the prompt (redacted, if it was)
    originals: tuple[str, ...] = ()  # the caller's label for each of `labels`
    schema: Any = None  # Extract: the parsed schema, as sent
    restore: tuple[tuple[str, str], ...] = ()  # schema string as sent -> as the caller wrote it
    max_tokens: int | None = None
    allow_none: bool = False  # Classify: "none of these" is an answer

    def render(self) -> list[dict[str, str]]:
        """The messages exactly as the cloud gets them."""
        if self.kind == "classify":
            return [{"role": "user", "content": classify_prompt(self)}]
        if self.kind == "extract":
            task = self.instruction or "Extract the fields as JSON."
            schema = json.dumps(self.schema, ensure_ascii=False)
            return [
                {"role": "system", "content": f"{task} Reply with JSON that matches this JSON "
                                              f"Schema, and nothing else: {schema}"},
                {"role": "user", "content": self.text},
            ]  # fmt: skip
        return [{"role": m.role, "content": m.content} for m in self.messages]

    def parts(self) -> list[str]:
        """Every string the request carries, in the order the cloud reads them."""
        if self.kind == "classify":
            return [self.instruction, *self.labels, self.text]
        if self.kind == "extract":
            return [self.instruction, *_strings(self.schema), self.text]
        return [m.content for m in self.messages]

    def with_parts(self, parts: Sequence[str]) -> Outbound:
        """The same request with its parts replaced (as `parts()` listed them)."""
        it = iter(parts)
        if self.kind == "classify":
            instruction, labels = next(it), tuple(next(it) for _ in self.labels)
            return replace(self, instruction=instruction, labels=labels, text=next(it))
        if self.kind == "extract":
            instruction = next(it)
            olds = list(_strings(self.schema))
            schema = _rebuild(self.schema, it)
            news = list(_strings(schema))
            restore = dict(self.restore)
            pairs = {
                new: restore.get(old, old)
                for old, new in zip(olds, news, strict=True)
                if old != new
            }
            return replace(
                self,
                instruction=instruction,
                schema=schema,
                text=next(it),
                restore=(*self.restore, *pairs.items()),
            )
        msgs = tuple(ChatMessage(m.role, next(it)) for m in self.messages)
        return replace(self, messages=msgs)

    def label(self, sent: str) -> str:
        """The caller's label for a label as listed in the prompt."""
        return self.originals[self.labels.index(sent)]

    def restored(self, answer: str) -> str:
        """An Extract answer with the redacted schema keys and values it names put back,
        so it is checked against (and answers) the caller's schema."""
        if not self.restore:
            return answer
        try:
            parsed = json.loads(answer)
        except ValueError:
            return answer
        back = dict(self.restore)
        return json.dumps(_map(parsed, back), ensure_ascii=False)


def build(task: Task, labels: Sequence[str] = ()) -> Outbound:
    """The request a task sends (Classify: with `labels`, the label names it resolves to)."""
    if isinstance(task, ClassifyTask):
        return Outbound("classify", text=task.text, instruction=task.instruction,
                        labels=tuple(labels), originals=tuple(labels),
                        allow_none=task.allow_none)  # fmt: skip
    if isinstance(task, ExtractTask):
        return Outbound("extract", text=task.text, instruction=task.instruction,
                        schema=json.loads(task.schema), max_tokens=task.max_tokens)  # fmt: skip
    if isinstance(task, GenerateTask):
        return Outbound("chat", (ChatMessage("user", task.prompt),), max_tokens=task.max_tokens)
    if isinstance(task, ChatTask):
        return Outbound("chat", task.messages, max_tokens=task.max_tokens)
    raise TypeError(f"{task.kind} requests are never sent to the cloud")


def classify_prompt(out: Outbound) -> str:
    task = out.instruction or "Classify the text into exactly one of the labels."
    listing = "\n".join(f"- {label}" for label in out.labels)
    if out.allow_none:
        return (
            f"{task}\n\nLabels:\n{listing}\n\nText: {out.text}\n\nAnswer with the label only; "
            f"if the text belongs to none of the labels, answer {NONE_ANSWER}."
        )
    return f"{task}\n\nLabels:\n{listing}\n\nText: {out.text}\n\nAnswer with the label only."


def estimate(out: Outbound) -> tuple[int, int]:
    """Upper bounds of (prompt, completion) tokens, for the budget's reservation. A
    token is at least one byte of the request, plus a little per message."""
    prompt = sum(len(m["content"].encode()) + 8 for m in out.render()) + 16
    if out.kind == "extract":  # the schema also travels in response_format
        prompt += len(json.dumps(out.schema).encode())
    if out.kind == "classify":  # an answer that names no label is asked once more
        return 2 * prompt + CLASSIFY_MAX_TOKENS + 64, 2 * CLASSIFY_MAX_TOKENS
    return prompt, out.max_tokens or DEFAULT_COMPLETION_TOKENS


class Gate:
    """The one check between a request and the cloud.

    The router and the cloud client share one Gate, so `update` (a reload of
    `cloud.sensitive`, `cloud.sensitive_patterns`, `cloud.redact`) reaches both at once.
    The scanner and the redact switch are one pair, swapped in one assignment: a check
    running in a thread meanwhile sees the old pair or the new, never half of each.
    """

    def __init__(self, scanner: Scanner, redact: bool) -> None:
        self._rules = (scanner, redact)

    @property
    def scanner(self) -> Scanner:
        return self._rules[0]

    @property
    def redact(self) -> bool:
        return self._rules[1]

    def update(self, scanner: Scanner, redact: bool) -> None:
        """Enforce new detectors, patterns and redaction from the next request on."""
        self._rules = (scanner, redact)

    def kinds(self, out: Outbound) -> list[str]:
        return self.scanner.kinds(out.parts())

    async def kinds_async(self, out: Outbound) -> list[str]:
        if sum(len(p) for p in out.parts()) > OFF_LOOP_CHARS:
            return await asyncio.to_thread(self.kinds, out)
        return self.kinds(out)

    async def check_async(
        self, messages: Sequence[Mapping[str, str]], response_format: dict[str, Any] | None
    ) -> tuple[list[dict[str, str]], dict[str, Any] | None]:
        if sum(len(m["content"]) for m in messages) > OFF_LOOP_CHARS:
            return await asyncio.to_thread(self.check, messages, response_format)
        return self.check(messages, response_format)

    def redacted(self, out: Outbound) -> Outbound:
        parts = out.parts()
        cleaned = self.scanner.redact_all(parts)
        if cleaned == parts:
            return out
        red = out.with_parts(cleaned)
        if out.kind == "classify" and len(set(red.labels)) < len(red.labels):
            # Two labels that differ only in their sensitive values: number them apart.
            red = replace(red, labels=tuple(f"{x} ({i + 1})" for i, x in enumerate(red.labels)))
        return red

    def check(
        self, messages: Sequence[Mapping[str, str]], response_format: dict[str, Any] | None
    ) -> tuple[list[dict[str, str]], dict[str, Any] | None]:
        """The final payload, cleaned if redaction is on; SensitiveData if not."""
        scanner, redact = self._rules  # one pair for the whole check, whatever `update` does
        parts = [m["content"] for m in messages] + list(_strings(response_format))
        found = scanner.find_all(parts)
        if not any(found):
            return [dict(m) for m in messages], response_format
        kinds = sorted({m.kind for ms in found for m in ms})
        if not redact:
            raise SensitiveData(kinds)
        cleaned = iter(scanner.redact_all(parts))
        msgs = [{**m, "content": next(cleaned)} for m in messages]
        fmt = _rebuild(response_format, cleaned)
        if scanner.kinds([m["content"] for m in msgs] + list(_strings(fmt))):
            raise SensitiveData(kinds)  # a custom pattern that matches its own placeholder
        return msgs, fmt


def _strings(v: Any) -> Iterator[str]:
    """Every key, string and number in a JSON value, depth first."""
    if isinstance(v, dict):
        for k, x in v.items():
            yield str(k)
            yield from _strings(x)
    elif isinstance(v, list):
        for x in v:
            yield from _strings(x)
    elif isinstance(v, str):
        yield v
    elif isinstance(v, int | float) and not isinstance(v, bool):
        yield str(v)


def _rebuild(v: Any, it: Iterator[str]) -> Any:
    """`v` with its strings taken from `it`, in `_strings` order (a number whose text
    was redacted becomes the redacted string)."""
    if isinstance(v, dict):
        out = {}
        for x in v.values():
            key = next(it)  # the key comes before its value, as `_strings` lists them
            out[key] = _rebuild(x, it)
        return out
    if isinstance(v, list):
        return [_rebuild(x, it) for x in v]
    if isinstance(v, str):
        return next(it)
    if isinstance(v, int | float) and not isinstance(v, bool):
        s = next(it)
        return v if s == str(v) else s
    return v


def _map(v: Any, back: dict[str, str]) -> Any:
    if isinstance(v, dict):
        return {back.get(k, k): _map(x, back) for k, x in v.items()}
    if isinstance(v, list):
        return [_map(x, back) for x in v]
    if isinstance(v, str):
        return back.get(v, v)
    return v
