"""Who is calling over gRPC: the key the fair queue uses to take turns between applications."""

from __future__ import annotations

from typing import Any

from sidecar.calls.callers import CALLER_HEADER, caller_key
from sidecar.server.peercred import parse_peer


def caller_of(context: Any) -> str:
    """A stable key per calling application.

    On the Unix socket: the kernel's uid and pid of the connecting process (see
    `peercred`), so one busy process cannot starve another. Processes of one uid that
    want to be treated as one application (or one process hosting several) can add
    `x-sidecar-caller` metadata, which refines the key but never crosses uids. On TCP
    the bearer token identifies the caller, as on the HTTP endpoint (`sidecar.calls.callers`).
    """
    metadata = dict(context.invocation_metadata() or ())
    named = metadata.get(CALLER_HEADER)
    peer = str(context.peer())
    creds = parse_peer(peer)
    if creds is not None:
        uid, pid = creds
        return f"uid:{uid}/app:{named}" if named else f"uid:{uid}/pid:{pid}"
    token = metadata.get("authorization")
    return caller_key(str(token) if token else None, named, f"peer:{peer}")
