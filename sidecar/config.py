"""The one place configuration is built: defaults < TOML < environment < CLI flags.

Nothing else in sidecar reads the environment or the config file. `load()` returns a
frozen `Config`; an invalid value raises `ConfigError` naming the TOML key.

TOML layout (every key optional)::

    default_model = "demo"

    [server]
    socket = "/run/user/1000/sidecar/sidecar.sock"
    ...

    [log]
    format = "json"

    [models.demo]
    path = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    workers = 2

Environment: SIDECAR_CONFIG (file path), SIDECAR_<SECTION>_<KEY> for the server, log,
metrics, store, http, update and cloud keys (lists comma-separated) (e.g. SIDECAR_SERVER_SOCKET, SIDECAR_HTTP_TOKEN), SIDECAR_DEFAULT_MODEL, and
SIDECAR_MODEL_<KEY> for the default model's keys (e.g. SIDECAR_MODEL_PATH).

Two views, one loader: `load()` is the daemon's whole Config; `load_client()` is what a
client needs to find the daemon (server.socket, server.tcp_token), read from the same file
and environment but without the daemon's cross-checks (a token kept in the service's
environment, a model file only the service can read). With no --config and no
SIDECAR_CONFIG, both read the user config file; a client with none falls back to the system
service's /etc/sidecar/config.toml, so a plain `sidecar status` finds the packaged daemon.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from sidecar.domain.errors import ConfigError
from sidecar.domain.names import name_problem, shown
from sidecar.router.privacy import Scanner  # the detectors own what a valid pattern is

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the machines run 3.11
    import tomli as tomllib

APP = "sidecar"
DEFAULT_MODEL_NAME = "default"


@dataclass(frozen=True)
class Key:
    """One documented setting: its type, default and what it means."""

    type: type
    default: Any
    doc: str
    check: Callable[[Any], str | None] = lambda _v: None  # returns a problem or None


def _at_least(n: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= n else f"must be >= {n}, got {v}"


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}, got {v!r}"


def _loopback(v: str) -> str | None:
    if v == "localhost":
        return None
    try:
        if ipaddress.ip_address(v).is_loopback:
            return None
    except ValueError:
        pass
    return f"must be a loopback address (127.0.0.1, ::1 or localhost), got {v!r}"


def _port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else f"must be 0 (off) or a port 1-65535, got {v}"


def _token(v: str) -> str | None:
    """A bearer token: empty (none) or real. A blank one would pass for set while no caller
    could send it: HTTP and gRPC strip the whitespace around header values."""
    if v and not v.strip():
        return "is blank (only whitespace): set a real token, or leave it empty for none"
    if v != v.strip():
        return "starts or ends with whitespace, which no Authorization header can carry"
    return None


SERVER_KEYS: dict[str, Key] = {
    "socket": Key(str, "", "Unix socket path. Default: <user runtime dir>/sidecar/sidecar.sock."),
    "socket_group_access": Key(
        bool, False, "Create the socket 0660 (owner+group) instead of 0600."
    ),
    "peer_credentials": Key(
        bool,
        True,
        "Identify socket callers by kernel uid/pid (a relay in front of gRPC) for fair queueing.",
    ),
    "max_message_bytes": Key(
        int, 4 * 1024 * 1024, "Largest request accepted, in bytes.", _at_least(1024)
    ),
    "default_max_tokens": Key(int, 256, "max_tokens when a request leaves it 0.", _at_least(1)),
    "max_labels": Key(int, 256, "Most labels one Classify may carry.", _at_least(2)),
    "max_embed_texts": Key(int, 256, "Most texts one Embed may carry.", _at_least(1)),
    "grace_seconds": Key(
        float, 10.0, "On SIGTERM, how long in-flight requests may finish.", _at_least(0)
    ),
    "ping_interval_seconds": Key(
        float, 2.0, "How often the supervisor pings each worker.", _at_least(0.05)
    ),
    "hang_seconds": Key(
        float, 30.0, "A worker silent this long (stuck or stopped) is killed.", _at_least(0.1)
    ),
    "probe_interval_seconds": Key(
        float, 30.0, "How often readiness is re-proven with a one-token generation.", _at_least(0.1)
    ),
    "min_available_mb": Key(
        int, 256, "Below this much free system memory, new requests are shed.", _at_least(0)
    ),
    "tcp_port": Key(int, 0, "Optional TCP listener port on tcp_host; 0 = off.", _port),
    "tcp_host": Key(str, "127.0.0.1", "TCP listener address; loopback only.", _loopback),
    "tcp_token": Key(
        str, "", "Bearer token required on TCP (prefer SIDECAR_SERVER_TCP_TOKEN).", _token
    ),
}

LOG_KEYS: dict[str, Key] = {
    "format": Key(
        str, "text", "Log line format: text or json (JSON lines).", _one_of("text", "json")
    ),
    "level": Key(str, "info", "Log level.", _one_of("debug", "info", "warning", "error")),
}


def _strategy(v: str) -> str | None:
    return _one_of("side_by_side", "replace")(v)


STORE_KEYS: dict[str, Key] = {
    "path": Key(str, "", "Model store directory. Default: <user data dir>/sidecar/store."),
    "drop": Key(str, "", "Watched folder: a complete .gguf appearing here is added; empty = off."),
    "auto_swap": Key(bool, True, "Swap to a file dropped in the folder once it is added."),
    "swap_strategy": Key(
        str, "side_by_side", "side_by_side (needs memory for both) or replace.", _strategy
    ),
    "drain_seconds": Key(
        float, 30.0, "How long old workers may finish after a flip.", _at_least(0)
    ),
    "swap_wait_seconds": Key(
        float,
        30.0,
        "replace strategy: how long new requests may wait for the new model.",
        _at_least(0),
    ),
}

METRICS_KEYS: dict[str, Key] = {
    "port": Key(int, 0, "Prometheus /metrics on metrics.host:port; 0 = off.", _port),
    "host": Key(str, "127.0.0.1", "Metrics listener address; loopback only.", _loopback),
    "socket": Key(str, "", "Prometheus /metrics on this Unix socket path instead; empty = off."),
}

HTTP_KEYS: dict[str, Key] = {
    "port": Key(
        int, 0, "OpenAI-compatible HTTP API on http.host:port; 0 = off (needs http.token).", _port
    ),
    "host": Key(str, "127.0.0.1", "HTTP API listener address; loopback only.", _loopback),
    "socket": Key(str, "", "OpenAI-compatible HTTP API on this Unix socket path; empty = off."),
    "token": Key(
        str,
        "",
        "Bearer token (the SDK's api_key) the HTTP API requires; required with http.port "
        "(prefer SIDECAR_HTTP_TOKEN).",
        _token,
    ),
}

MODEL_KEYS: dict[str, Key] = {
    "path": Key(str, "", "GGUF file to serve (required)."),
    "workers": Key(
        int, 2, "Worker processes for this model; they share the mmapped weights.", _at_least(1)
    ),
    "threads": Key(
        int, 1, "llama.cpp threads per worker (1 holds up beside busy apps).", _at_least(1)
    ),
    "context": Key(int, 2048, "Context window in tokens (prompt + generation).", _at_least(64)),
    "batch": Key(int, 512, "Prompt-processing batch size in tokens.", _at_least(1)),
    "max_rss_mb": Key(
        int, 0, "Replace a worker (between requests) whose RSS exceeds this; 0 = off.", _at_least(0)
    ),
    "canary_prompt": Key(str, "", "Prompt every new worker must answer before a swap flips to it."),
    "canary_expect": Key(str, "", "Regex the canary reply must match (empty: any token)."),
    "canary_max_ms": Key(int, 0, "Latency budget for the canary in ms; 0 = none.", _at_least(0)),
    "max_queue": Key(
        int, 64, "Requests that may wait for a worker; beyond: RESOURCE_EXHAUSTED.", _at_least(1)
    ),
    "update_origin": Key(
        str, "", "Update origin: https://, http:// or a folder holding NAME.manifest.json."
    ),
    "update_key": Key(
        str, "", "Trusted Ed25519 public key ('ed25519:<base64>' or a file holding it)."
    ),
}

UPDATE_KEYS: dict[str, Key] = {
    "interval_seconds": Key(
        float,
        3600.0,
        "How often models with an update_origin check it; 0 = only on demand.",
        _at_least(0),
    ),
    "healthy_seconds": Key(
        float,
        60.0,
        "A new version must serve this long without a worker death or failed "
        "probe, or it is rolled back.",
        _at_least(0),
    ),
    "timeout_seconds": Key(
        float, 30.0, "Network timeout per request to the origin.", _at_least(0.1)
    ),
    "retries": Key(
        int, 5, "Retries (resuming) of a failed download before giving up.", _at_least(0)
    ),
    "fetch_deadline_seconds": Key(
        float,
        0.0,
        "Longest one download (retries included) may take before it is cut; its partial "
        "file stays and the next apply resumes it. 0 = derived from the size: 60 s plus "
        "the bytes still missing at fetch_min_bytes_per_second.",
        _at_least(0),
    ),
    "fetch_min_bytes_per_second": Key(
        int,
        65536,
        "Slowest origin accepted: a download that gets fewer bytes than this rate over "
        "timeout_seconds is cut and retried (a trickling origin cannot hold it open).",
        _at_least(1),
    ),
}


def _routing(v: str) -> str | None:
    return _one_of("AUTO", "LOCAL_ONLY", "CLOUD_ONLY")(v)


def _env_name(v: str) -> str | None:
    # The TOML names the variable; a key pasted here by mistake must not sit in a file.
    if v and not v.replace("_", "").isalnum():
        return f"must be the NAME of an environment variable (e.g. OPENAI_API_KEY), got {v[:4]}..."
    return None


def _strings(v: list[Any]) -> str | None:
    return None if all(isinstance(x, str) for x in v) else "must be a list of strings"


def _probability(v: float) -> str | None:
    return None if 0.0 <= v <= 1.0 else f"must be between 0 and 1, got {v}"


CLOUD_KEYS: dict[str, Key] = {
    "base_url": Key(
        str, "", "OpenAI-compatible endpoint (e.g. https://api.openai.com/v1); empty = no cloud."
    ),
    "model": Key(str, "", "Model name the cloud is asked for."),
    "api_key_env": Key(
        str, "", "NAME of the environment variable holding the API key (never the key).", _env_name
    ),
    "routing": Key(str, "AUTO", "Default routing: AUTO, LOCAL_ONLY or CLOUD_ONLY.", _routing),
    "timeout_seconds": Key(float, 30.0, "Timeout of one cloud attempt.", _at_least(0.1)),
    "retries": Key(int, 2, "Retries on 429, 5xx, timeouts and connection errors.", _at_least(0)),
    "backoff_seconds": Key(float, 0.5, "First retry wait (doubles, with jitter).", _at_least(0)),
    "local_timeout_seconds": Key(
        float,
        0.0,
        "AUTO gives the local model this long, then cancels it and escalates; 0 = no limit.",
        _at_least(0),
    ),
    "breaker_failures": Key(
        int, 5, "Consecutive failed calls that open the circuit breaker.", _at_least(1)
    ),
    "breaker_cooldown_seconds": Key(
        float, 30.0, "How long the breaker stays open before one probe call.", _at_least(0)
    ),
    "prompt_price_per_mtok": Key(
        float, 0.0, "Price of a million prompt tokens (for cost and caps).", _at_least(0)
    ),
    "completion_price_per_mtok": Key(
        float, 0.0, "Price of a million completion tokens.", _at_least(0)
    ),
    "daily_cap": Key(float, 0.0, "Most spent per UTC day; 0 = no cap.", _at_least(0)),
    "monthly_cap": Key(float, 0.0, "Most spent per UTC month; 0 = no cap.", _at_least(0)),
    "sensitive": Key(
        list,
        ["email", "card", "iban", "phone"],
        "Detectors that make a request sensitive (email, card, iban, phone).",
        _strings,
    ),
    "sensitive_patterns": Key(list, [], "Extra regexes that make a request sensitive.", _strings),
    "redact": Key(
        bool, False, "Escalate sensitive requests with the matches replaced, instead of never."
    ),
    "classify_threshold": Key(
        float, 0.7, "AUTO escalates a Classify whose top probability is below this.", _probability
    ),
    "classify_margin": Key(
        float, 0.0, "...or whose top-minus-runner-up margin is below this; 0 = off.", _probability
    ),
    "extract_mean_logprob": Key(
        float, -1.0, "AUTO escalates an Extract whose mean token log-probability is below this."
    ),
    "generate_mean_logprob": Key(
        float, -1.5, "AUTO escalates a Generate/Chat whose mean token log-probability is below."
    ),
    "generate_min_logprob": Key(
        float, -100.0, "...or whose least likely token is below this (-100 = off)."
    ),
    "pre_route_max_chars": Key(
        int, 0, "AUTO sends requests longer than this straight to the cloud; 0 = off.", _at_least(0)
    ),
    "pre_route_keywords": Key(
        list,
        [],
        "AUTO sends requests containing any of these words straight to the cloud.",
        _strings,
    ),
    "pre_route_tasks": Key(
        list,
        [],
        "AUTO sends these kinds (generate, chat, classify, extract) to the cloud.",
        _strings,
    ),
}

TASK_KEYS: dict[str, Key] = {
    "file": Key(str, "", "CSV file of labelled examples (required)."),
    "text_column": Key(str, "text", "Column holding the example text."),
    "label_column": Key(str, "label", "Column holding the example's label."),
    "model": Key(str, "", "Model that embeds and scores; empty = the default model."),
    "instruction": Key(str, "", "Task description for label scoring."),
    "threshold": Key(
        float,
        -1.0,
        "AUTO escalates below this calibrated confidence; -1 = cloud.classify_threshold.",
    ),
    "label_scoring": Key(bool, False, "Also score the shortlisted labels with the model (slower)."),
    "cascade": Key(
        bool,
        True,
        "Answer from the words alone where held-out examples show the model would not "
        "change the answer; false = run the model for every request.",
    ),
}

TOP_KEYS: dict[str, Key] = {
    "default_model": Key(str, "", "Model name that requests without `model` get."),
}


@dataclass(frozen=True)
class ServerConfig:
    socket: Path
    socket_group_access: bool
    peer_credentials: bool
    max_message_bytes: int
    default_max_tokens: int
    max_labels: int
    max_embed_texts: int
    grace_seconds: float
    ping_interval_seconds: float
    hang_seconds: float
    probe_interval_seconds: float
    min_available_mb: int
    tcp_port: int
    tcp_host: str
    tcp_token: str

    @property
    def socket_mode(self) -> int:
        return 0o660 if self.socket_group_access else 0o600


@dataclass(frozen=True)
class LogConfig:
    format: str
    level: str


@dataclass(frozen=True)
class StoreConfig:
    path: Path
    drop: Path | None
    auto_swap: bool
    swap_strategy: str
    drain_seconds: float
    swap_wait_seconds: float


def default_store_path() -> Path:
    return Path(platformdirs.user_data_dir(APP)) / "store"


@dataclass(frozen=True)
class MetricsConfig:
    port: int
    host: str
    socket: str

    @property
    def enabled(self) -> bool:
        return bool(self.port or self.socket)


@dataclass(frozen=True)
class UpdateConfig:
    interval_seconds: float
    healthy_seconds: float
    timeout_seconds: float
    retries: int
    fetch_deadline_seconds: float = 0.0
    fetch_min_bytes_per_second: int = 65536


@dataclass(frozen=True)
class HttpConfig:
    port: int
    host: str
    socket: str
    token: str

    @property
    def enabled(self) -> bool:
        return bool(self.port or self.socket)


@dataclass(frozen=True)
class CloudConfig:
    base_url: str
    model: str
    api_key_env: str
    routing: str
    timeout_seconds: float
    retries: int
    backoff_seconds: float
    local_timeout_seconds: float
    breaker_failures: int
    breaker_cooldown_seconds: float
    prompt_price_per_mtok: float
    completion_price_per_mtok: float
    daily_cap: float
    monthly_cap: float
    sensitive: tuple[str, ...]
    sensitive_patterns: tuple[str, ...]
    redact: bool
    classify_threshold: float
    classify_margin: float
    extract_mean_logprob: float
    generate_mean_logprob: float
    generate_min_logprob: float
    pre_route_max_chars: int
    pre_route_keywords: tuple[str, ...]
    pre_route_tasks: tuple[str, ...]

    @property
    def enabled(self) -> bool:
        return bool(self.base_url)


def _cloud_defaults() -> CloudConfig:
    raw = {k: v.default for k, v in CLOUD_KEYS.items()}
    return CloudConfig(**_tuples(raw))


def _tuples(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}


@dataclass(frozen=True)
class TaskConfig:
    name: str
    file: Path
    text_column: str
    label_column: str
    model: str
    instruction: str
    threshold: float
    label_scoring: bool
    cascade: bool = True


@dataclass(frozen=True)
class ModelConfig:
    name: str
    path: Path
    workers: int
    threads: int
    context: int
    batch: int
    max_rss_mb: int
    canary_prompt: str
    canary_expect: str
    canary_max_ms: int
    max_queue: int
    update_origin: str
    update_key: str


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    log: LogConfig
    metrics: MetricsConfig = MetricsConfig(0, "127.0.0.1", "")
    http: HttpConfig = HttpConfig(0, "127.0.0.1", "", "")
    update: UpdateConfig = UpdateConfig(3600.0, 60.0, 30.0, 5)
    store: StoreConfig = StoreConfig(Path("store"), None, True, "side_by_side", 30.0, 30.0)
    models: tuple[ModelConfig, ...] = ()
    default_model: str = ""
    cloud: CloudConfig = field(default_factory=_cloud_defaults)
    tasks: tuple[TaskConfig, ...] = ()
    source: Path | None = None  # the TOML file read, if any

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


@dataclass(frozen=True)
class Overrides:
    """CLI flags, already parsed; None = not given."""

    config: Path | None = None
    socket: Path | None = None
    model: str | None = None  # a configured name, or a GGUF path
    workers: int | None = None
    threads: int | None = None
    context: int | None = None
    log_format: str | None = None
    log_level: str | None = None
    tcp_port: int | None = None
    store: Path | None = None
    http_port: int | None = None
    http_socket: Path | None = None


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


# The system service's config (the Debian package ships it; `sidecar service install` points
# the system unit at it). Not platformdirs' site dir (/etc/xdg/sidecar): /etc/sidecar is
# where a system daemon's config lives on Linux.
SYSTEM_CONFIG = Path("/etc/sidecar/config.toml")


def default_socket_path(env: Mapping[str, str] | None = None) -> Path:
    """<runtime dir>/sidecar/sidecar.sock, the per-user runtime directory when there is one."""
    env = os.environ if env is None else env
    if sys.platform == "darwin":
        return Path(platformdirs.user_runtime_dir(APP)) / "sidecar.sock"
    candidates = [env.get("XDG_RUNTIME_DIR", ""), f"/run/user/{os.getuid()}"]
    # /run/user/<uid> exists only in a login session; a service or container may lack it.
    base = next((Path(c) for c in candidates if c and os.access(c, os.W_OK)), None)
    runtime = base / APP if base else Path(tempfile.gettempdir()) / f"{APP}-{os.getuid()}"
    return runtime / "sidecar.sock"


def _coerce(key: str, spec: Key, value: Any) -> Any:
    if spec.type is list and isinstance(value, str):  # from the environment: comma-separated
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, str) and spec.type is not str:
        text = value.strip()
        try:
            if spec.type is bool:
                if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(text)
                value = text.lower() in ("1", "true", "yes", "on")
            else:
                value = spec.type(text)
        except ValueError:
            raise ConfigError(key, f"expected {spec.type.__name__}, got {value!r}") from None
    if spec.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, spec.type) or (spec.type is int and isinstance(value, bool)):
        raise ConfigError(
            key, f"expected {spec.type.__name__}, got {type(value).__name__} {value!r}"
        )
    problem = spec.check(value)
    if problem:
        raise ConfigError(key, problem)
    return value


def _section(prefix: str, keys: dict[str, Key], raw: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown key (known: {', '.join(keys)})")
    out = {name: spec.default for name, spec in keys.items()}
    for name, value in raw.items():
        out[name] = _coerce(f"{prefix}{name}", keys[name], value)
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), "config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"not valid TOML: {e}") from None
    except OSError as e:  # e.g. a system config this user may not read
        raise ConfigError(str(path), f"cannot read the config file: {e.strerror or e}") from None


def _read_source(
    o: Overrides, env: Mapping[str, str], defaults: Sequence[Path]
) -> tuple[dict[str, Any], Path | None]:
    """The TOML table and the file it came from: --config, else SIDECAR_CONFIG, else the
    first of `defaults` that exists (None when none does, or when that one is empty)."""
    path = o.config or (Path(env["SIDECAR_CONFIG"]) if env.get("SIDECAR_CONFIG") else None)
    if path is not None:
        return _read_toml(path), path
    found = next((p for p in defaults if p.exists()), None)
    raw = _read_toml(found) if found is not None else {}
    return raw, found if raw else None


def _socket_path(value: str, env: Mapping[str, str]) -> Path:
    return Path(value).expanduser() if value else default_socket_path(env)


def _env_layer(
    env: Mapping[str, str],
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, Any]]:
    tables = (
        ("server", SERVER_KEYS),
        ("log", LOG_KEYS),
        ("metrics", METRICS_KEYS),
        ("store", STORE_KEYS),
        ("http", HTTP_KEYS),
        ("update", UPDATE_KEYS),
        ("cloud", CLOUD_KEYS),
    )
    sections: dict[str, dict[str, Any]] = {name: {} for name, _ in tables}
    for section, keys in tables:
        for name in keys:
            var = f"SIDECAR_{section}_{name}".upper()
            if var in env:
                sections[section][name] = env[var]
    model = {
        name: env[f"SIDECAR_MODEL_{name}".upper()]
        for name in MODEL_KEYS
        if f"SIDECAR_MODEL_{name}".upper() in env
    }
    top = {"default_model": env["SIDECAR_DEFAULT_MODEL"]} if "SIDECAR_DEFAULT_MODEL" in env else {}
    return sections, model, top


TABLES = ("server", "log", "metrics", "store", "http", "update", "cloud", "models", "tasks")


def _cloud(raw: Mapping[str, Any], env: Mapping[str, Any]) -> CloudConfig:
    fields = _section("cloud.", CLOUD_KEYS, {**raw, **env})
    if fields["base_url"] and not fields["model"]:
        raise ConfigError("cloud.model", "required when cloud.base_url is set")
    if fields["base_url"] and not fields["base_url"].startswith(("http://", "https://")):
        raise ConfigError(
            "cloud.base_url", f"must start with http:// or https://, got {fields['base_url']!r}"
        )
    try:
        Scanner(fields["sensitive"], fields["sensitive_patterns"])
    except ValueError as e:
        raise ConfigError("cloud.sensitive", str(e)) from None
    kinds = {"generate", "chat", "classify", "extract"}
    bad = [t for t in fields["pre_route_tasks"] if t not in kinds]
    if bad:
        raise ConfigError(
            "cloud.pre_route_tasks", f"unknown task {bad[0]!r} (known: {', '.join(sorted(kinds))})"
        )
    return CloudConfig(**_tuples(fields))


def _tasks(
    raw: Mapping[str, Any], models: Mapping[str, Any], base: Path | None
) -> tuple[TaskConfig, ...]:
    out = []
    for name, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"tasks.{name}", "must be a table")
        fields = _section(f"tasks.{name}.", TASK_KEYS, table)
        if not fields["file"]:
            raise ConfigError(f"tasks.{name}.file", "required: the CSV file of labelled examples")
        path = Path(fields["file"]).expanduser()
        if not path.is_absolute() and base is not None:
            path = base.parent / path  # relative to the config file, like include paths
        if fields["model"] and fields["model"] not in models:
            raise ConfigError(f"tasks.{name}.model", f"no [models.{fields['model']}] table")
        if fields["threshold"] != -1.0 and not 0.0 <= fields["threshold"] <= 1.0:
            raise ConfigError(f"tasks.{name}.threshold", "must be -1 or between 0 and 1")
        out.append(TaskConfig(name=name, **{**fields, "file": path}))
    return tuple(out)


def load(overrides: Overrides | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build the Config. Raises ConfigError naming the offending key."""
    o = overrides or Overrides()
    env = os.environ if env is None else env

    # Only the user's file: a daemon started by hand is the user's own, not the system one.
    raw, source = _read_source(o, env, (default_config_path(),))

    unknown = sorted(set(raw) - {*TABLES, *TOP_KEYS})
    if unknown:
        raise ConfigError(
            unknown[0],
            "unknown key (known: default_model, "
            + ", ".join(f"[{t}]" for t in TABLES)
            .replace("[models]", "[models.NAME]")
            .replace("[tasks]", "[tasks.NAME]")
            + ")",
        )
    for table in TABLES:
        if not isinstance(raw.get(table, {}), dict):
            raise ConfigError(table, "must be a table")

    env_sections, env_model, env_top = _env_layer(env)
    server_raw = {**raw.get("server", {}), **env_sections["server"]}
    log_raw = {**raw.get("log", {}), **env_sections["log"]}
    top = _section("", TOP_KEYS, {k: raw[k] for k in TOP_KEYS if k in raw} | env_top)

    cli_server = {"socket": str(o.socket) if o.socket else None, "tcp_port": o.tcp_port}
    server_raw |= {k: v for k, v in cli_server.items() if v is not None}
    log_raw |= {
        k: v for k, v in {"format": o.log_format, "level": o.log_level}.items() if v is not None
    }

    server = _section("server.", SERVER_KEYS, server_raw)
    log = _section("log.", LOG_KEYS, log_raw)
    metrics = _section(
        "metrics.", METRICS_KEYS, {**raw.get("metrics", {}), **env_sections["metrics"]}
    )
    http_raw = {**raw.get("http", {}), **env_sections["http"]}
    cli_http = {"port": o.http_port, "socket": str(o.http_socket) if o.http_socket else None}
    http_raw |= {k: v for k, v in cli_http.items() if v is not None}
    http = _section("http.", HTTP_KEYS, http_raw)
    if http["port"] and not http["token"]:
        raise ConfigError("http.token", "required when http.port is set (TCP needs a bearer token)")
    http["socket"] = str(Path(http["socket"]).expanduser()) if http["socket"] else ""
    update = _section("update.", UPDATE_KEYS, {**raw.get("update", {}), **env_sections["update"]})
    store_raw = {**raw.get("store", {}), **env_sections["store"]}
    if o.store is not None:
        store_raw["path"] = str(o.store)
    store = _section("store.", STORE_KEYS, store_raw)
    store["path"] = Path(store["path"]).expanduser() if store["path"] else default_store_path()
    store["drop"] = Path(store["drop"]).expanduser() if store["drop"] else None

    models_raw: dict[str, dict[str, Any]] = {}
    for name, table in raw.get("models", {}).items():
        if problem := name_problem(name):  # the name is a directory in the model store
            raise ConfigError(f"models.{shown(name)}", problem)
        if not isinstance(table, dict):
            raise ConfigError(f"models.{name}", "must be a table")
        models_raw[name] = dict(table)

    if top["default_model"] and (problem := name_problem(top["default_model"])):
        raise ConfigError("default_model", problem)
    default_name = top["default_model"] or (next(iter(models_raw)) if models_raw else "")
    if o.model is not None:
        if o.model in models_raw:
            default_name = o.model
        else:  # a path: it becomes (or replaces the file of) the default model
            default_name = default_name or DEFAULT_MODEL_NAME
            models_raw.setdefault(default_name, {})["path"] = o.model
    cli_model = {"workers": o.workers, "threads": o.threads, "context": o.context}
    if env_model or any(v is not None for v in cli_model.values()):
        default_name = default_name or DEFAULT_MODEL_NAME
        target = models_raw.setdefault(default_name, {})
        target |= env_model
        target |= {k: v for k, v in cli_model.items() if v is not None}
    if default_name and default_name not in models_raw:
        raise ConfigError(
            "default_model",
            f"no [models.{default_name}] table (known: {', '.join(models_raw) or 'none'})",
        )

    models = []
    for model_name, model_table in models_raw.items():
        fields = _section(f"models.{model_name}.", MODEL_KEYS, model_table)
        if not fields["path"]:
            raise ConfigError(f"models.{model_name}.path", "required: the GGUF file to serve")
        models.append(
            ModelConfig(name=model_name, **{**fields, "path": Path(fields["path"]).expanduser()})
        )

    if server["tcp_port"] and not server["tcp_token"]:
        raise ConfigError(
            "server.tcp_token", "required when server.tcp_port is set (TCP needs a bearer token)"
        )
    server["socket"] = _socket_path(server["socket"], env)

    cloud = _cloud(raw.get("cloud", {}), env_sections["cloud"])
    tasks = _tasks(raw.get("tasks", {}), models_raw, source)

    return Config(
        cloud=cloud,
        tasks=tasks,
        server=ServerConfig(**server),
        log=LogConfig(**log),
        metrics=MetricsConfig(**metrics),
        http=HttpConfig(**http),
        update=UpdateConfig(**update),
        store=StoreConfig(**store),
        models=tuple(models),
        default_model=default_name,
        source=source,
    )


@dataclass(frozen=True)
class ClientConfig:
    """The client's view: where the daemon listens and the token its TCP listener wants."""

    socket: Path
    tcp_token: str
    source: Path | None  # the TOML file read, if any


CLIENT_KEYS = ("socket", "tcp_token")  # of [server]: all a client reads


def load_client(
    overrides: Overrides | None = None, env: Mapping[str, str] | None = None
) -> ClientConfig:
    """Build the client's view (only `overrides.config` and `.socket` count). The keys it
    reads are checked as `load()` checks them, and an unknown [server] key is still an error
    (a misspelt `socket` would send the client elsewhere); the rest of the file is the
    daemon's business."""
    o = overrides or Overrides()
    env = os.environ if env is None else env
    raw, source = _read_source(o, env, (default_config_path(), SYSTEM_CONFIG))
    table = raw.get("server", {})
    if not isinstance(table, dict):
        raise ConfigError("server", "must be a table")
    unknown = sorted(set(table) - set(SERVER_KEYS))
    if unknown:
        raise ConfigError(f"server.{unknown[0]}", f"unknown key (known: {', '.join(SERVER_KEYS)})")
    given = {**table, **_env_layer(env)[0]["server"]}
    if o.socket is not None:
        given["socket"] = str(o.socket)
    keys = {k: SERVER_KEYS[k] for k in CLIENT_KEYS}
    fields = _section("server.", keys, {k: v for k, v in given.items() if k in keys})
    return ClientConfig(_socket_path(fields["socket"], env), fields["tcp_token"], source)


def documented_keys() -> list[tuple[str, Key]]:
    """Every key with its doc, for the README and `sidecar config keys`."""
    rows = [(k, v) for k, v in TOP_KEYS.items()]
    rows += [(f"server.{k}", v) for k, v in SERVER_KEYS.items()]
    rows += [(f"log.{k}", v) for k, v in LOG_KEYS.items()]
    rows += [(f"metrics.{k}", v) for k, v in METRICS_KEYS.items()]
    rows += [(f"store.{k}", v) for k, v in STORE_KEYS.items()]
    rows += [(f"http.{k}", v) for k, v in HTTP_KEYS.items()]
    rows += [(f"update.{k}", v) for k, v in UPDATE_KEYS.items()]
    rows += [(f"models.NAME.{k}", v) for k, v in MODEL_KEYS.items()]
    rows += [(f"cloud.{k}", v) for k, v in CLOUD_KEYS.items()]
    rows += [(f"tasks.NAME.{k}", v) for k, v in TASK_KEYS.items()]
    return rows
