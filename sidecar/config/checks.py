"""Checks a single value can fail, each returning the problem (or None when it is fine).

Bounds (`minimum=`) and choices (`Literal[...]`) are checked by the field itself; these are
the rest. A check sees the value as TOML gives it, before paths are resolved.
"""

from __future__ import annotations

import ipaddress

from sidecar.domain.detectors import unknown_detectors


def loopback(v: str) -> str | None:
    if v == "localhost":
        return None
    try:
        if ipaddress.ip_address(v).is_loopback:
            return None
    except ValueError:
        pass
    return f"must be a loopback address (127.0.0.1, ::1 or localhost), got {v!r}"


def port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else f"must be 0 (off) or a port 1-65535, got {v}"


def token(v: str) -> str | None:
    """A bearer token: empty (none) or real. A blank one would pass for set while no caller
    could send it: HTTP and gRPC strip the whitespace around header values."""
    if v and not v.strip():
        return "is blank (only whitespace): set a real token, or leave it empty for none"
    if v != v.strip():
        return "starts or ends with whitespace, which no Authorization header can carry"
    return None


def store_key(v: str) -> str | None:
    """A store key: empty (none) or 64 hex digits (`sidecar models keygen`)."""
    if not v:
        return None
    try:
        ok = len(bytes.fromhex(v.strip())) == 32
    except ValueError:
        ok = False
    return None if ok else "is not a store key: expected 64 hex digits (sidecar models keygen)"


def identity(v: str) -> str | None:
    # Hashed into the rollout cohort: a stray space or newline from a template would put the
    # machine in another cohort than the operator computed.
    if v != v.strip() or any(not c.isprintable() for c in v):
        return "must not start or end with whitespace or hold control characters"
    if len(v) > 256:
        return f"must be at most 256 characters, got {len(v)}"
    return None


def env_name(v: str) -> str | None:
    # The TOML names the variable; a key pasted here by mistake must not sit in a file.
    if v and not v.replace("_", "").isalnum():
        return f"must be the NAME of an environment variable (e.g. OPENAI_API_KEY), got {v[:4]}..."
    return None


def probability(v: float) -> str | None:
    return None if 0.0 <= v <= 1.0 else f"must be between 0 and 1, got {v}"


def latency_factor(v: float) -> str | None:
    # Below 1 the new version would be rolled back for being as fast as the old one.
    return None if v == 0 or v >= 1 else f"must be 0 (off) or at least 1, got {v}"


def detectors(v: tuple[str, ...]) -> str | None:
    return unknown_detectors(v)


TASK_KINDS = ("chat", "classify", "extract", "generate")


def task_kinds(v: tuple[str, ...]) -> str | None:
    bad = [t for t in v if t not in TASK_KINDS]
    return f"unknown task {bad[0]!r} (known: {', '.join(TASK_KINDS)})" if bad else None


def threshold_or_off(v: float) -> str | None:
    return None if v == -1.0 or 0.0 <= v <= 1.0 else "must be -1 or between 0 and 1"


def url(v: str) -> str | None:
    if v and not v.startswith(("http://", "https://")):
        return f"must start with http:// or https://, got {v!r}"
    return None
