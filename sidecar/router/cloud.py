"""The cloud side of escalation: an OpenAI-compatible Chat Completions endpoint.

Uses the maintained `openai` SDK (works against OpenAI, vLLM, Ollama, LiteLLM's proxy and
llama.cpp's servers). The SDK's own retries are off: this module retries 429, 5xx,
timeouts and connection errors itself, with jittered exponential backoff, so every
attempt is seen by the circuit breaker. A 4xx other than 429 is the request's fault, not
the endpoint's: no retry, and the breaker does not count it.

Classify keeps its contract through the cloud: the answer must be one of the labels
(matched exactly, then ignoring case and punctuation), or "none of these" when the caller
allows it (`allow_none`); any other answer is asked once more, then reported as invalid
so the caller can keep the local answer.

Every call goes through `chat`, and `chat` passes the payload through the gate
(`outbound.Gate.check`) right before the SDK sees it: the last line of defence if
anything upstream missed personal data. A `Meter` passed along sums the usage of every
call that got an answer, so a retry or an answer rejected later is still paid for.
"""

from __future__ import annotations

import asyncio
import copy
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import openai

from sidecar.router.breaker import Breaker
from sidecar.router.outbound import (
    CLASSIFY_MAX_TOKENS,
    NONE_ANSWER,
    RETRY_LABEL,
    RETRY_LABEL_OR_NONE,
    Gate,
    Outbound,
)
from sidecar.router.privacy import Scanner

# What `ask_label` and `match_label` return for "none of these" (labels are never empty).
NONE = ""


@dataclass(frozen=True)
class CloudEndpoint:
    """Where and how the client reaches the cloud (built from `[cloud]` of the config)."""

    base_url: str
    model: str
    api_key_env: str = ""  # the NAME of the variable holding the key, never the key
    timeout_s: float = 30.0
    retries: int = 2
    backoff_s: float = 0.5


class CloudError(Exception):
    """The cloud gave no usable answer; `reason` is a short label for replies and metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class Meter:
    """The usage of one escalation, summed over its calls."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0


@dataclass(frozen=True)
class CloudReply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    attempts: int
    finish_reason: str = "stop"


RETRYABLE = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError)


class CloudClient:
    def __init__(
        self,
        cfg: CloudEndpoint,
        breaker: Breaker,
        env: Mapping[str, str],
        gate: Gate | None = None,
    ) -> None:
        self.cfg = cfg
        self.breaker = breaker
        self.gate = gate or Gate(Scanner(), redact=False)
        key = env.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        self._client = openai.AsyncOpenAI(
            base_url=cfg.base_url,
            api_key=key or "unused",  # local OpenAI-compatible servers often need none
            timeout=cfg.timeout_s,
            max_retries=0,
        )
        self._json_form = "json_schema"  # the structured-output form this server takes

    def twin(self) -> CloudClient:
        """The same endpoint, breaker and gate with an HTTP client of its own, for use on
        another event loop (the shadow calls', see `shadow_loop`)."""
        other = copy.copy(self)
        other._client = openai.AsyncOpenAI(
            base_url=self._client.base_url,
            api_key=self._client.api_key,
            timeout=self._client.timeout,
            max_retries=0,
        )
        return other

    async def close(self) -> None:
        await self._client.close()

    async def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        max_tokens: int | None = None,
        response_format: dict[str, Any] | None = None,
        meter: Meter | None = None,
    ) -> CloudReply:
        # The single point where a cloud request is built: nothing is sent past the gate
        # (it raises SensitiveData, or returns the payload redacted).
        messages, response_format = await self.gate.check_async(messages, response_format)
        if not self.breaker.allow():
            raise CloudError("breaker_open", "the cloud circuit breaker is open")
        started = time.perf_counter()
        last = "no attempt"
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                await asyncio.sleep(
                    self.cfg.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
                )
            try:
                kw: dict[str, Any] = {"model": self.cfg.model, "messages": list(messages),
                                      "temperature": 0}  # fmt: skip
                if max_tokens is not None:
                    kw["max_tokens"] = max_tokens
                if response_format is not None:
                    kw["response_format"] = response_format
                resp = await self._client.chat.completions.create(**kw)
            except openai.APIStatusError as e:
                # The SDK keeps only the body's `message` in str(e); FastAPI servers put
                # the reason in `detail`, so look at the whole body.
                said = f"{e} {getattr(e, 'body', '')}"
                if response_format is not None and "response_format" in said:
                    # This server does not take this structured-output form (some answer a
                    # 500 for it): the caller tries another form. Not the endpoint's fault.
                    raise CloudError("format_rejected", _describe(e)) from None
                if isinstance(e, RETRYABLE):
                    last = _describe(e)
                    continue
                # Any other 4xx: our request is wrong; retrying will not help.
                raise CloudError(f"http_{e.status_code}", _describe(e)) from None
            except RETRYABLE as e:
                last = _describe(e)
                continue
            except (openai.APIError, ValueError) as e:  # e.g. a body that is not JSON
                last = f"malformed reply: {type(e).__name__}: {e}"
                continue
            text = _text(resp)
            if text is None:
                last = "malformed reply: no message content"
                continue
            self.breaker.success()
            usage = getattr(resp, "usage", None)
            prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
            completion = int(getattr(usage, "completion_tokens", 0) or 0)
            if meter is not None:
                meter.prompt_tokens += prompt
                meter.completion_tokens += completion
                meter.calls += 1
            return CloudReply(
                text=text,
                prompt_tokens=prompt,
                completion_tokens=completion,
                latency_ms=(time.perf_counter() - started) * 1000,
                attempts=attempt + 1,
                finish_reason=_finish(resp),
            )
        self.breaker.failure()
        raise CloudError(
            _reason(last), f"the cloud failed after {self.cfg.retries + 1} attempt(s): {last}"
        )

    async def ask_label(
        self, out: Outbound, meter: Meter | None = None
    ) -> tuple[str | None, CloudReply]:
        """The caller's label the cloud picked (a redacted label is mapped back), NONE for
        "none of these" (only when `out.allow_none`), or None if it named none of them
        twice."""
        messages = out.render()
        reply = await self.chat(messages, max_tokens=CLASSIFY_MAX_TOKENS, meter=meter)
        label = match_label(reply.text, out.labels, allow_none=out.allow_none)
        if label is None:
            again = [
                *messages,
                {"role": "assistant", "content": reply.text},
                {"role": "user", "content": RETRY_LABEL_OR_NONE if out.allow_none else RETRY_LABEL},
            ]
            reply = await self.chat(again, max_tokens=CLASSIFY_MAX_TOKENS, meter=meter)
            label = match_label(reply.text, out.labels, allow_none=out.allow_none)
        if label is None or label == NONE:
            return label, reply
        return out.label(label), reply

    async def ask_json(self, out: Outbound, meter: Meter | None = None) -> CloudReply:
        """JSON text for the schema (the caller validates it: the contract is checked once),
        with any redacted schema keys and values put back.

        Servers differ in how they take a schema: OpenAI, vLLM and llama.cpp's C++ server
        take `json_schema`; llama-cpp-python's server takes `json_object` with a `schema`;
        others take neither. The first form this server accepts is remembered.
        """
        parsed = out.schema
        messages = out.render()
        forms: dict[str, dict[str, Any] | None] = {
            "json_schema": {"type": "json_schema",
                            "json_schema": {"name": "extract", "schema": parsed}},
            "json_object": {"type": "json_object", "schema": parsed},
            "prompt": None,
        }  # fmt: skip
        order = [self._json_form, *(f for f in forms if f != self._json_form)]
        for form in order:
            try:
                reply = await self.chat(
                    messages, max_tokens=out.max_tokens, response_format=forms[form], meter=meter
                )
            except CloudError as e:
                if e.reason == "format_rejected":
                    continue
                raise
            self._json_form = form
            return replace(reply, text=out.restored(reply.text))
        raise CloudError("format_rejected", "the cloud refused every structured-output form")


def _text(resp: Any) -> str | None:
    try:
        content = resp.choices[0].message.content
    except (AttributeError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _finish(resp: Any) -> str:
    try:
        return str(resp.choices[0].finish_reason or "stop")
    except (AttributeError, IndexError, TypeError):
        return "stop"


def _describe(e: Exception) -> str:
    status = getattr(e, "status_code", None)
    kind = type(e).__name__
    return f"{kind} (HTTP {status})" if status else f"{kind}: {e}"


def _reason(last: str) -> str:
    if "RateLimit" in last:
        return "http_429"
    if "InternalServer" in last:
        return "http_5xx"
    if "Timeout" in last:
        return "timeout"
    if "Connection" in last:
        return "connection"
    return "malformed"


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", s.lower()).strip()


def match_label(answer: str, labels: Sequence[str], *, allow_none: bool = False) -> str | None:
    """Map a free-text answer to one label: exact, then normalised, then (with allow_none)
    "none of these" as NONE, then the one label the answer contains (if exactly one)."""
    a = answer.strip().strip("`'\".").strip()
    if a in labels:
        return a
    by_norm = {_norm(label): label for label in labels}
    if _norm(a) in by_norm:
        return by_norm[_norm(a)]
    if allow_none and _norm(a) in (_norm(NONE_ANSWER), "none"):
        return NONE
    inside = [
        label for n, label in by_norm.items() if n and re.search(rf"\b{re.escape(n)}\b", _norm(a))
    ]
    return inside[0] if len(inside) == 1 else None
