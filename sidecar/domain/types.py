"""Domain types: what the engine is asked and what it answers.

Plain frozen dataclasses that pickle across the worker pipe. Nothing here knows
about protobuf; `sidecar.server.convert` is the only place that translates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Kind = Literal["generate", "chat", "classify", "extract", "embed"]


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy (deterministic)
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    repeat_penalty: float = 1.0
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


MAX_TOP_LOGPROBS = 20  # as OpenAI


@dataclass(frozen=True)
class AdapterFile:
    """The LoRA adapter version a job runs with: the daemon resolves a request's adapter
    name to the store's active version when the job is submitted (so a swap never changes
    what a running job uses) and the worker applies this file."""

    name: str
    sha256: str
    path: Path
    scale: float = 1.0


@dataclass(frozen=True)
class GenerateTask:
    prompt: str
    max_tokens: int | None  # None = the server default, capped to what fits
    sampling: Sampling = Sampling()
    kind: Kind = "generate"
    logprobs: bool = False  # return each token's log-probability
    top_logprobs: int = 0  # and this many alternatives per token (needs logprobs)
    adapter: str = ""  # a LoRA adapter of the model, by name ("" = none)
    lora: AdapterFile | None = None  # that adapter's version, filled in by the engine


@dataclass(frozen=True)
class ChatTask:
    messages: tuple[ChatMessage, ...]
    max_tokens: int | None
    sampling: Sampling = Sampling()
    kind: Kind = "chat"
    logprobs: bool = False
    top_logprobs: int = 0
    adapter: str = ""
    lora: AdapterFile | None = None


@dataclass(frozen=True)
class ClassifyTask:
    text: str
    labels: tuple[str, ...]
    instruction: str = ""
    kind: Kind = "classify"
    # Classify by labelled examples (text, label) or by a task named in the config; the
    # daemon turns these into plain label tasks before a worker sees them.
    examples: tuple[tuple[str, str], ...] = ()
    task: str = ""
    # The caller accepts "none of these": an out-of-scope text then gets no label.
    allow_none: bool = False
    adapter: str = ""
    lora: AdapterFile | None = None


@dataclass(frozen=True)
class ExtractTask:
    text: str
    schema: str  # JSON text, already checked to be a valid JSON Schema
    instruction: str = ""
    max_tokens: int | None = None
    kind: Kind = "extract"
    adapter: str = ""
    lora: AdapterFile | None = None


@dataclass(frozen=True)
class EmbedTask:
    texts: tuple[str, ...]
    normalize: bool = False
    kind: Kind = "embed"


Task = GenerateTask | ChatTask | ClassifyTask | ExtractTask | EmbedTask
AdaptableTask = GenerateTask | ChatTask | ClassifyTask | ExtractTask
StreamableTask = GenerateTask | ChatTask


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str


Routing = Literal["", "AUTO", "LOCAL_ONLY", "CLOUD_ONLY"]  # "" = the configured default
# What `cloud.routing` may be set to: the default a request with routing "" gets.
ConfiguredRouting = Literal["AUTO", "LOCAL_ONLY", "CLOUD_ONLY"]


@dataclass(frozen=True)
class RouteRequest:
    """How the caller wants a request routed; not sent to workers."""

    routing: Routing = ""
    sensitive: bool = False


@dataclass(frozen=True)
class RouteInfo:
    """Who answered and why, on every routed reply."""

    served_by: Literal["local", "cloud"] = "local"
    reason: str = ""  # why it was escalated, or why escalation was blocked; "" = neither
    local_confidence: float | None = None  # None: the local model did not answer
    cloud_latency_ms: float = 0.0
    cost: float = 0.0  # estimated from the usage the cloud reported and the configured prices
    code: str = ""  # the reason as a fixed label
    threshold: float | None = None  # what the local confidence was compared with
    threshold_source: str = ""  # where that threshold came from (a config key, a fit)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Timings:
    queue_ms: float = 0.0
    first_token_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True)
class TokenConfidence:
    mean_logprob: float
    min_logprob: float

    @staticmethod
    def of(logprobs: list[float]) -> TokenConfidence:
        if not logprobs:
            return TokenConfidence(0.0, 0.0)
        return TokenConfidence(sum(logprobs) / len(logprobs), min(logprobs))


@dataclass(frozen=True)
class TopLogprob:
    token: str  # the token's bytes decoded alone (may hold U+FFFD for a split character)
    bytes: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token: its text is the slice of the reply text it produced."""

    token: str
    bytes: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()  # most likely first


FinishReason = Literal["stop", "length"]


@dataclass
class Generation:
    text: str
    finish_reason: FinishReason
    usage: Usage
    confidence: TokenConfidence
    model: ModelRef | None = None
    timings: Timings = field(default_factory=Timings)
    route: RouteInfo = RouteInfo()
    logprobs: tuple[TokenLogprob, ...] = ()  # when asked, and a local model answered
    adapter: ModelRef | None = None  # the LoRA adapter version that answered, if any


@dataclass(frozen=True)
class LabelScore:
    label: str
    probability: float
    logprob: float


@dataclass
class Classification:
    label: str
    scores: tuple[LabelScore, ...]  # best first
    usage: Usage
    model: ModelRef | None = None
    timings: Timings = field(default_factory=Timings)
    route: RouteInfo = RouteInfo()
    # Out-of-scope detection: `novelty` in [0, 1] (higher = less like anything the labels
    # cover; None = not measured), and whether it crossed the task's cut. With the
    # request's allow_none, an out-of-scope answer has label "".
    novelty: float | None = None
    out_of_scope: bool = False
    adapter: ModelRef | None = None

    @property
    def top_probability(self) -> float:
        return self.scores[0].probability

    @property
    def margin(self) -> float:
        runner_up = self.scores[1].probability if len(self.scores) > 1 else 0.0
        return self.scores[0].probability - runner_up


@dataclass
class Extraction:
    json: str
    usage: Usage
    confidence: TokenConfidence
    model: ModelRef | None = None
    timings: Timings = field(default_factory=Timings)
    route: RouteInfo = RouteInfo()
    adapter: ModelRef | None = None


@dataclass
class Embeddings:
    vectors: list[list[float]]
    usage: Usage
    model: ModelRef | None = None
    timings: Timings = field(default_factory=Timings)
    route: RouteInfo = RouteInfo()


Result = Generation | Classification | Extraction | Embeddings


@dataclass(frozen=True)
class TokenEvent:
    """A streamed piece of text (already valid UTF-8, stop sequences held back)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens whose text this piece releases
