"""Who is calling: the key the fair queue uses to take turns between applications."""

from __future__ import annotations

import hashlib
from typing import Any

CALLER_METADATA = "x-sidecar-caller"


def caller_of(context: Any) -> str:
    """A stable key per calling application.

    On TCP the bearer token identifies the caller. On the Unix socket gRPC Python does
    not expose the peer's credentials (SO_PEERCRED), so an application may name itself
    with `x-sidecar-caller` metadata; otherwise the connection's peer string is used,
    which separates connections (each client channel is one connection).
    """
    metadata = dict(context.invocation_metadata() or ())
    named = metadata.get(CALLER_METADATA)
    if named:
        return f"app:{named}"
    token = metadata.get("authorization")
    if token:
        return "token:" + hashlib.sha256(str(token).encode()).hexdigest()[:12]
    return f"peer:{context.peer()}"
