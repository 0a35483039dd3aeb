"""The schema: every configuration key, declared once, as a field of a frozen dataclass.

A field's annotation is its type (`Literal[...]` for a choice, `tuple[str, ...]` for a
list), and `setting(...)` gives its TOML default, one-line doc, bounds or check, and
whether SIGHUP applies it live (`live=True`) or it needs a restart. `Config` lists the
sections: a section dataclass is a `[section]` table, a `table(...)` field a list of
`[section.NAME]` tables, a `setting(...)` field a top-level key. The loader, the env
names, `reload.diff`, `sidecar config --keys` and docs/configuration.md all read it from
here (see `each_key()`), so adding a field here is all it takes to add a key.

No `from __future__ import annotations` here on purpose: the field types stay real
objects that the loader reads without evaluating strings.
"""

# setting(...) returns a dataclasses.field (it only fills in metadata), which RUF009 cannot see.
# ruff: noqa: RUF009

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from sidecar.config import checks
from sidecar.config.fields import (
    SETTING,
    TABLE,
    Setting,
    Table,
    optional,
    problem,
    required,
    setting,
    table,
    type_name,
)
from sidecar.config.paths import default_socket_path, default_store_path
from sidecar.domain.detectors import DETECTORS
from sidecar.domain.types import ConfiguredRouting

LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]
SwapStrategy = Literal["side_by_side", "replace"]
LoadPolicy = Literal["at_start", "on_demand"]
KvCache = Literal["auto", "f16", "q8_0"]


@dataclass(frozen=True)
class ServerConfig:
    """The daemon's gRPC listeners, request limits and worker supervision."""

    socket: Path = setting(
        "",
        "Unix socket path. Default: <user runtime dir>/sidecar/sidecar.sock.",
        fallback=default_socket_path,
    )
    socket_group_access: bool = setting(
        False, "Create the socket 0660 (owner + group) instead of 0600."
    )
    peer_credentials: bool = setting(
        True,
        "Identify socket callers by kernel uid/pid (a relay in front of gRPC) for fair queueing.",
    )
    max_message_bytes: int = setting(
        4 * 1024 * 1024, "Largest request accepted, in bytes.", minimum=1024
    )
    default_max_tokens: int = setting(
        256,
        "max_tokens when a request leaves it 0 (capped to what fits the context); the "
        "workers take it at start.",
        minimum=1,
    )
    max_labels: int = setting(256, "Most labels one Classify may carry.", minimum=2, live=True)
    max_embed_texts: int = setting(256, "Most texts one Embed may carry.", minimum=1, live=True)
    grace_seconds: float = setting(
        10.0, "On SIGTERM, how long in-flight requests may finish.", minimum=0, live=True
    )
    ping_interval_seconds: float = setting(
        2.0, "How often the supervisor pings each worker.", minimum=0.05, live=True
    )
    hang_seconds: float = setting(
        30.0,
        "A worker that does not answer a ping this long (stuck in native code, stopped) is "
        "killed and replaced.",
        minimum=0.1,
        live=True,
    )
    probe_interval_seconds: float = setting(
        30.0,
        "How often readiness is re-proven with a one-token generation.",
        minimum=0.1,
        live=True,
    )
    min_available_mb: int = setting(
        256,
        "Below this much available system memory new requests get RESOURCE_EXHAUSTED (with a "
        "retry hint) instead of risking the OOM killer; 0 = off.",
        minimum=0,
        live=True,
    )
    max_model_memory_mb: int = setting(
        0,
        "Memory budget for loaded models (weights + KV cache, estimated from the GGUF): "
        "loading one unloads the least recently used idle models until it fits; 0 = no budget.",
        minimum=0,
        live=True,
    )
    tcp_port: int = setting(
        0, "Optional TCP listener port on tcp_host; 0 = off.", check=checks.port
    )
    tcp_host: str = setting(
        "127.0.0.1", "TCP listener address; loopback only.", check=checks.loopback
    )
    tcp_token: str = setting(
        "",
        "Bearer token required on TCP (required with tcp_port; prefer SIDECAR_SERVER_TCP_TOKEN).",
        check=checks.token,
    )

    @property
    def socket_mode(self) -> int:
        return 0o660 if self.socket_group_access else 0o600


@dataclass(frozen=True)
class LogConfig:
    """Log lines."""

    format: LogFormat = setting("text", "Log line format: text or json (JSON lines).", live=True)
    level: LogLevel = setting("info", "Log level.", live=True)


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus `/metrics` endpoint (off by default)."""

    port: int = setting(0, "Prometheus /metrics on metrics.host:port; 0 = off.", check=checks.port)
    host: str = setting(
        "127.0.0.1", "Metrics listener address; loopback only.", check=checks.loopback
    )
    socket: str = setting(
        "", "Prometheus /metrics on this Unix socket path (mode 0600) instead; empty = off."
    )

    @property
    def enabled(self) -> bool:
        return bool(self.port or self.socket)


@dataclass(frozen=True)
class StoreConfig:
    """The model store, the watched drop folder and hot swaps."""

    path: Path = setting(
        "",
        "Model store directory (versions by sha256, active pointers, quarantine). "
        "Default: <user data dir>/sidecar/store.",
        fallback=lambda _env: default_store_path(),
    )
    drop: Path | None = setting(
        "",
        "Watched folder: a complete .gguf appearing in it (or in drop/NAME/) is added to the "
        "store; empty = off.",
    )
    auto_swap: bool = setting(True, "Swap to a dropped file once it is added.", live=True)
    drop_remove_plaintext: bool = setting(
        True,
        "Delete a dropped file once it is imported or refused; false keeps it, moved to "
        "drop/.imported/ or drop/.refused/ (never imported again): plaintext on disk, even "
        "with store.encryption.",
        live=True,
    )
    swap_strategy: SwapStrategy = setting(
        "side_by_side",
        "side_by_side (both models in memory for a moment; checked first) or replace "
        "(drain, then load).",
        live=True,
    )
    drain_seconds: float = setting(
        30.0,
        "How long the old workers may finish their requests after a flip.",
        minimum=0,
        live=True,
    )
    swap_wait_seconds: float = setting(
        30.0,
        "replace strategy: how long new requests wait for the new model before UNAVAILABLE.",
        minimum=0,
        live=True,
    )
    encryption: bool = setting(
        False,
        "Encrypt every blob written to the store (models, quarantine) with AES-256-GCM; "
        "workers map the decrypted model from sealed memory (Linux memfd), never from disk. "
        "Needs a key: a systemd credential named sidecar-store-key, store.key_file or "
        "SIDECAR_STORE_KEY. See docs/encryption.md.",
    )
    key_file: Path | None = setting(
        "",
        "The store key (64 hex digits, `sidecar models keygen -o PATH`); refused unless owned "
        "by the daemon's user and mode 0600. A systemd credential wins over it.",
    )
    previous_key_file: Path | None = setting(
        "",
        "The key before a rekey: blobs still sealed with it stay readable (each blob names "
        "its key) until `sidecar models rekey` has moved them all to the current key.",
    )
    key: str = setting(
        "",
        "The store key itself, meant as SIDECAR_STORE_KEY: the weakest source (a process's "
        "environment is visible to root and to whatever inherits it); prefer key_file or a "
        "systemd credential.",
        check=checks.store_key,
    )


@dataclass(frozen=True)
class HttpConfig:
    """The OpenAI-compatible HTTP API (off by default)."""

    port: int = setting(
        0,
        "OpenAI-compatible HTTP API on http.host:port; 0 = off (needs http.token).",
        check=checks.port,
    )
    host: str = setting(
        "127.0.0.1", "HTTP API listener address; loopback only.", check=checks.loopback
    )
    socket: str = setting(
        "",
        "OpenAI-compatible HTTP API on this Unix socket path (mode 0600, or 0660 with "
        "server.socket_group_access); empty = off.",
    )
    token: str = setting(
        "",
        "Bearer token (the SDK's api_key) the HTTP API requires; required with http.port, "
        "optional on the socket (prefer SIDECAR_HTTP_TOKEN).",
        check=checks.token,
    )

    @property
    def enabled(self) -> bool:
        return bool(self.port or self.socket)


@dataclass(frozen=True)
class UpdateConfig:
    """Signed delta updates, for models with an `update_origin`."""

    interval_seconds: float = setting(
        3600.0,
        "How often models with an update_origin check it; 0 = only on demand.",
        minimum=0,
        live=True,
    )
    healthy_seconds: float = setting(
        60.0,
        "A new version must serve this long without a worker death or failed probe, or it is "
        "rolled back.",
        minimum=0,
        live=True,
    )
    timeout_seconds: float = setting(
        30.0, "Network timeout per request to the origin.", minimum=0.1, live=True
    )
    retries: int = setting(
        5, "Retries (resuming) of a failed download before giving up.", minimum=0, live=True
    )
    fetch_deadline_seconds: float = setting(
        0.0,
        "Longest one download (retries included) may take before it is cut; its partial file "
        "stays and the next apply resumes it. 0 = derived from the size: 60 s plus the bytes "
        "still missing at fetch_min_bytes_per_second.",
        minimum=0,
        live=True,
    )
    fetch_min_bytes_per_second: int = setting(
        65536,
        "Slowest origin accepted: a download that gets fewer bytes than this rate over "
        "timeout_seconds is cut and retried (a trickling origin cannot hold it open).",
        minimum=1,
        live=True,
    )
    identity: str = setting(
        "",
        "This machine's identity in a fleet, hashed with a version to decide whether this "
        "daemon is in that version's staged rollout. Empty = derived from /etc/machine-id "
        "(a sidecar-specific hash of it), else a random id kept in <store>/updates/.identity "
        "(kept once chosen, even if a machine-id appears later). "
        "Set it where machines share a machine-id (cloned images) or to match an inventory.",
        check=checks.identity,
        live=True,
    )
    catalog_origin: str = setting(
        "",
        "Where `sidecar pull NAME` finds NAME.manifest.json (https://, http:// or a folder) "
        "for a NAME without its own models.NAME.update_origin. Read by the CLI per pull.",
        live=True,
    )
    catalog_key: str = setting(
        "",
        "The Ed25519 public key the catalog's manifests must be signed with ('ed25519:<base64>' "
        "or a file holding it).",
        live=True,
    )


@dataclass(frozen=True)
class CloudConfig:
    """Cloud escalation: the endpoint, routing, budgets, the privacy gate and the thresholds AUTO escalates below."""

    base_url: str = setting(
        "",
        "OpenAI-compatible endpoint (e.g. https://api.openai.com/v1); empty = no cloud.",
        check=checks.url,
    )
    model: str = setting("", "Model name the cloud is asked for (required with base_url).")
    api_key_env: str = setting(
        "",
        "NAME of the environment variable holding the API key (never the key).",
        check=checks.env_name,
    )
    routing: ConfiguredRouting = setting(
        "AUTO", "Default routing: AUTO, LOCAL_ONLY or CLOUD_ONLY.", live=True
    )
    timeout_seconds: float = setting(30.0, "Timeout of one cloud attempt.", minimum=0.1)
    retries: int = setting(2, "Retries on 429, 5xx, timeouts and connection errors.", minimum=0)
    backoff_seconds: float = setting(0.5, "First retry wait (doubles, with jitter).", minimum=0)
    local_timeout_seconds: float = setting(
        0.0,
        "AUTO gives the local model this long, then cancels it and escalates (a low-priority "
        "request: counted from when a worker takes it); 0 = no limit.",
        minimum=0,
        live=True,
    )
    breaker_failures: int = setting(
        5, "Consecutive failed calls that open the circuit breaker.", minimum=1
    )
    breaker_cooldown_seconds: float = setting(
        30.0, "How long the breaker stays open before one probe call.", minimum=0
    )
    prompt_price_per_mtok: float = setting(
        0.0, "Price of a million prompt tokens (for cost and caps).", minimum=0, live=True
    )
    completion_price_per_mtok: float = setting(
        0.0, "Price of a million completion tokens.", minimum=0, live=True
    )
    daily_cap: float = setting(0.0, "Most spent per UTC day; 0 = no cap.", minimum=0, live=True)
    monthly_cap: float = setting(0.0, "Most spent per UTC month; 0 = no cap.", minimum=0, live=True)
    sensitive: tuple[str, ...] = setting(
        DETECTORS,
        f"Detectors that make a request sensitive ({', '.join(DETECTORS)}).",
        check=checks.detectors,
        live=True,
    )
    sensitive_patterns: tuple[str, ...] = setting(
        (), "Extra regexes that make a request sensitive.", live=True
    )
    redact: bool = setting(
        False,
        "Escalate sensitive requests with the matches replaced, instead of never.",
        live=True,
    )
    classify_threshold: float = setting(
        0.7,
        "AUTO escalates a Classify whose (calibrated) top probability is below this.",
        check=checks.probability,
        live=True,
    )
    classify_margin: float = setting(
        0.0,
        "...or whose top-minus-runner-up margin is below this; 0 = off.",
        check=checks.probability,
        live=True,
    )
    classify_none_novelty: float = setting(
        0.8,
        "A Classify by labels alone (no examples, no task) whose novelty (0-1, from the label "
        "mass) is at least this is out of scope: no label with allow_none, and AUTO "
        "escalates it; 0 = off. 0.8 called 8% of in-scope Banking77 questions out of scope.",
        check=checks.probability,
        live=True,
    )
    extract_mean_logprob: float = setting(
        -1.0,
        "AUTO escalates an Extract whose mean token log-probability is below this.",
        live=True,
    )
    generate_mean_logprob: float = setting(
        -1.5,
        "AUTO escalates a Generate/Chat whose mean token log-probability is below this.",
        live=True,
    )
    generate_min_logprob: float = setting(
        -100.0, "...or whose least likely token is below this (-100 = off).", live=True
    )
    pre_route_max_chars: int = setting(
        0,
        "AUTO sends requests longer than this straight to the cloud; 0 = off.",
        minimum=0,
        live=True,
    )
    pre_route_keywords: tuple[str, ...] = setting(
        (),
        "AUTO sends requests containing any of these words straight to the cloud.",
        live=True,
    )
    pre_route_tasks: tuple[str, ...] = setting(
        (),
        f"AUTO sends these kinds ({', '.join(checks.TASK_KINDS)}) straight to the cloud.",
        check=checks.task_kinds,
        live=True,
    )
    shadow_rate: float = setting(
        0.0,
        "Share (0-1) of AUTO Classify/Extract requests answered locally that are also asked of "
        "the cloud after the reply, to measure agreement; never sensitive ones; 0 = off.",
        check=checks.probability,
        live=True,
    )
    shadow_daily_cap: float = setting(
        0.0,
        "Most spent per UTC day on shadow calls, apart from daily_cap; 0 = no cap.",
        minimum=0,
        live=True,
    )

    @property
    def enabled(self) -> bool:
        return bool(self.base_url)


@dataclass(frozen=True)
class ModelConfig:
    """A model to serve; NAME is how requests ask for it and its directory in the store."""

    name: str
    path: Path = required("GGUF file to serve (required).", "the GGUF file to serve")
    workers: int = setting(
        2, "Worker processes for this model; they share the mmapped weights.", minimum=1
    )
    threads: int = setting(
        0,
        "Most llama.cpp threads per worker; 0 = every usable CPU. Each decode step uses only"
        " as many as there are cores other processes leave idle (never fewer than 1).",
        minimum=0,
    )
    context: int = setting(2048, "Context window in tokens (prompt + generation).", minimum=64)
    batch: int = setting(
        512, "Prompt-processing batch in tokens; also the longest text Embed takes.", minimum=1
    )
    parallel: int = setting(
        1,
        "Requests each worker decodes together (continuous batching); each gets the full "
        "context window, so the KV cache grows with it. Above 1, greedy replies may differ "
        "slightly from the same request run alone.",
        minimum=1,
    )
    kv_cache: KvCache = setting(
        "f16",
        "How the KV cache stores keys and values. q8_0 takes about half the memory, a step "
        "that decodes one token may use every idle core (decode about 1.5x faster on 2 "
        "cores), and a reply is the same alone or batched; but prompts take about 1.6x as "
        "long (llama.cpp's attention has no batched kernel for it), and its logits differ "
        "slightly from f16's. f16 keeps one-token steps that attend over 512 or more cells "
        "on one thread (its attention would otherwise round differently per thread count). "
        "auto: q8_0 where the model's "
        "attention heads are a multiple of 32 wide, else f16.",
    )
    max_rss_mb: int = setting(
        0,
        "Replace a worker (between requests) whose RSS exceeds this; 0 = off.",
        minimum=0,
        live=True,
    )
    canary_prompt: str = setting(
        "",
        "Prompt every new worker must answer before a swap flips to it (empty: a one-token "
        "generation).",
    )
    canary_expect: str = setting("", "Regex the canary reply must match (empty: any token).")
    canary_max_ms: int = setting(0, "Latency budget for the canary in ms; 0 = none.", minimum=0)
    max_queue: int = setting(
        64,
        "Requests that may wait for a worker, and apart low-priority ones; beyond: "
        "RESOURCE_EXHAUSTED.",
        minimum=1,
        live=True,
    )
    load: LoadPolicy = setting(
        "at_start",
        "at_start: loaded when the daemon starts; on_demand: loaded by the first request "
        "(which waits for it) and unloaded after keep_alive seconds idle.",
    )
    keep_alive: float = setting(
        300.0,
        "Seconds an on_demand model stays loaded with no request; 0 = until unloaded by hand.",
        minimum=0,
        live=True,
    )
    update_origin: str = setting(
        "",
        "Update origin: https://, http:// or a folder holding NAME.manifest.json.",
        live=True,
    )
    update_key: str = setting(
        "",
        "Trusted Ed25519 public key ('ed25519:<base64>', as `sidecar update keygen` prints "
        "it, or a file holding it).",
        live=True,
    )
    eval: str = setting(
        "",
        "The eval gate: a config task whose eval_file is this model's golden set. Every "
        "swap, dropped file and update runs the candidate on it (zero-shot Classify over its "
        "labels) after the canary and refuses it below the bars; empty = no gate.",
        live=True,
    )
    eval_min_accuracy: float = setting(
        0.0,
        "The eval gate: the least accuracy (0-1) a candidate must reach on the golden set.",
        check=checks.probability,
        live=True,
    )
    eval_max_regression: float = setting(
        0.05,
        "The eval gate: how much lower (0-1, accuracy points) than the serving version's "
        "score a candidate's may be; 1 = any.",
        check=checks.probability,
        live=True,
    )
    probation_latency_factor: float = setting(
        0.0,
        "After an update: roll back when the new version's p99 latency (last 200 requests, "
        "at least 20) exceeds this many times the previous version's; 0 = off.",
        check=checks.latency_factor,
        live=True,
    )


@dataclass(frozen=True)
class TaskConfig:
    """A Classify-by-examples task: `Classify(task=NAME)` answers from labelled examples."""

    name: str
    file: Path = required(
        "CSV file of labelled examples for Classify(task=NAME) (required; relative to the "
        "config file).",
        "the CSV file of labelled examples",
        relative=True,
    )
    text_column: str = setting("text", "Column holding the example text.")
    label_column: str = setting("label", "Column holding the example's label.")
    model: str = setting("", "Model that embeds and scores; empty = the default model.")
    instruction: str = setting("", "Task description for label scoring.")
    threshold: float = setting(
        -1.0,
        "AUTO escalates below this calibrated confidence; -1 = cloud.classify_threshold.",
        check=checks.threshold_or_off,
        live=True,
    )
    target_accuracy: float = setting(
        0.0,
        "Let the daemon choose this task's threshold from shadow traffic (cloud.shadow_rate): "
        "the lowest at which this share of the local answers kept agreed with the cloud, "
        "within 0.5-0.99, once 50 pairs are in; 0 = off.",
        check=checks.probability,
        live=True,
    )
    label_scoring: bool = setting(
        False, "Also score the shortlisted labels with the model (slower)."
    )
    cascade: bool = setting(
        True,
        "Answer from the words alone where held-out examples show the model would not change "
        "the answer; false = run the model for every request.",
    )
    none_label: str = setting(
        "",
        "Rows with this label are out-of-scope examples (questions none of the labels "
        "cover), never a label; empty = none.",
    )
    none_file: Path | None = setting(
        "",
        "Optional CSV of out-of-scope texts (same text column; relative to the config file).",
        relative=True,
    )
    scope_alpha: float = setting(
        0.05,
        "A text is out of scope when its conformal p-value (how typical it is of held-out "
        "examples) is below this; about this share of in-scope texts is lost; 0 = off "
        "(none examples still count).",
        check=checks.probability,
        live=True,
    )
    eval_file: Path | None = setting(
        "",
        "Held-out CSV (same columns, rows not in `file`) that `sidecar eval NAME` scores the "
        "task on; relative to the config file. Read by the CLI per eval.",
        relative=True,
        live=True,
    )
    adapter: str = setting(
        "",
        "LoRA adapter of the task's model (`sidecar models add --adapter-for MODEL FILE "
        "--name NAME`) that its label scoring runs with; a request's own adapter wins; "
        "empty = none.",
    )


@dataclass(frozen=True)
class Config:
    """The whole configuration, frozen: built once by the loader, replaced whole on reload."""

    # Top-level keys, then the tables in the order the reference lists them.
    default_model: str = setting(
        "", "Model name that requests without `model` get (default: the first model)."
    )
    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    store: StoreConfig = dataclasses.field(default_factory=StoreConfig)
    http: HttpConfig = dataclasses.field(default_factory=HttpConfig)
    update: UpdateConfig = dataclasses.field(default_factory=UpdateConfig)
    cloud: CloudConfig = dataclasses.field(default_factory=CloudConfig)
    models: tuple[ModelConfig, ...] = table("Models to serve, by name.", env="MODEL")
    tasks: tuple[TaskConfig, ...] = table("Classify-by-examples tasks, by name.")
    source: Path | None = None  # the TOML file read, if any: where the settings came from

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


# ------------------------------------------------------------------ walking the schema


@dataclass(frozen=True)
class KeySpec:
    """One key of the schema, as everything derived from it sees it."""

    name: str  # the TOML name: "server.socket", "models.NAME.path", "default_model"
    section: str  # the Config field holding it: "server", "models", "" for a top-level key
    field: str  # the attribute on the section's dataclass (on Config for a top-level key)
    type: Any  # the annotation: int, Path, Path | None, tuple[str, ...], Literal[...]
    default: Any  # as written in TOML ("" for a path derived at load)
    doc: str
    env: str  # the environment variable ("" = none); SIDECAR_MODEL_* set the default model
    live: bool  # SIGHUP applies it; otherwise it is reported as needing a restart
    named: bool  # the section is a list of [section.NAME] tables
    setting: Setting

    @property
    def type_name(self) -> str:
        """As `config --keys` and the reference show it: int, str, list, text|json."""
        return type_name(self.type)

    @property
    def required(self) -> bool:
        return bool(self.setting.required)

    def check(self, value: Any) -> str | None:
        """The problem with a TOML-typed value, or None: the key's own checks only."""
        return problem(self.setting, self.type, value)


@dataclass(frozen=True)
class Section:
    """A Config field that holds settings: a [section] table or [section.NAME] tables."""

    name: str
    cls: type  # the section's dataclass; Config itself for the top-level keys
    named: bool
    env: str  # the env prefix of its keys: "SERVER", "MODEL"; "" = none


def _sections() -> tuple[Section, ...]:
    out = [Section("", Config, False, "")]
    for f in dataclasses.fields(Config):
        if TABLE in f.metadata:
            spec: Table = f.metadata[TABLE]
            (entry,) = {a for a in get_args(f.type) if a is not Ellipsis}
            out.append(Section(f.name, entry, True, spec.env))
        elif isinstance(f.type, type) and dataclasses.is_dataclass(f.type):
            out.append(Section(f.name, f.type, False, f.name.upper()))
    return tuple(out)


def _env(section: Section, field: str, s: Setting) -> str:
    """SIDECAR_<SECTION>_<KEY>, SIDECAR_<KEY> at the top, "" for a table list with none."""
    if not s.env or (section.name and not section.env):
        return ""
    return "_".join(p for p in ("SIDECAR", section.env, field) if p).upper()


def _keys(section: Section) -> tuple[KeySpec, ...]:
    out = []
    for f in dataclasses.fields(section.cls):
        s: Setting | None = f.metadata.get(SETTING)
        if s is None:
            continue  # a name, a section or where the file came from: not a key
        name = ".".join(p for p in (section.name, "NAME" if section.named else "", f.name) if p)
        env = _env(section, f.name, s)
        out.append(
            KeySpec(name, section.name, f.name, f.type, s.default, s.doc, env, s.live,
                    section.named, s)
        )  # fmt: skip
    return tuple(out)


SECTIONS: tuple[Section, ...] = _sections()
KEYS: dict[str, tuple[KeySpec, ...]] = {s.name: _keys(s) for s in SECTIONS}
_BY_NAME: dict[str, KeySpec] = {k.name: k for ks in KEYS.values() for k in ks}


def each_key() -> Iterator[KeySpec]:
    """Every key of the schema, top-level keys first, then table by table."""
    for section in SECTIONS:
        yield from KEYS[section.name]


def key(name: str) -> KeySpec:
    """The key named as in the TOML ("cloud.routing", "models.NAME.workers"); KeyError if none.
    A concrete model or task name ("models.chat.workers") finds its NAME key."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    first, _, rest = name.partition(".")
    return _BY_NAME[f"{first}.NAME.{rest.rpartition('.')[2]}"]


def base_type(spec: KeySpec) -> Any:
    """The key's type without `| None`."""
    return optional(spec.type)[0]
