"""Who is calling, and whether they may: one answer for both front ends.

gRPC and the OpenAI-compatible HTTP endpoint take the same bearer token form and derive
the same caller identity from it, so an application that moves from one API to the other
keeps its place in the fair queue and a token refused on one is refused on the other.
Only how the transport hands over the header, and what it knows of the peer, differs.
"""

from __future__ import annotations

import hashlib
import hmac

from sidecar.domain.errors import Unauthenticated

CALLER_HEADER = "x-sidecar-caller"  # gRPC metadata key and HTTP header: an app's own name


def token_caller(authorization: str) -> str:
    """The fair-queue key of a caller known by its token. Hashed: the key is logged and
    shown, the token must not be."""
    return "token:" + hashlib.sha256(authorization.encode()).hexdigest()[:12]


def caller_key(authorization: str | None, named: str | None, fallback: str) -> str:
    """A caller without kernel credentials: its token, else the name it gives, else
    `fallback` (what the transport knows of the peer)."""
    if authorization:
        return token_caller(authorization)
    return f"app:{named}" if named else fallback


class Bearer:
    """The check of an `authorization` value against a configured token ("" = no token
    configured: everyone passes). `hint` says where the token is configured and how to
    send it, in the caller's own vocabulary."""

    def __init__(self, token: str, hint: str) -> None:
        self._expected = b"Bearer " + token.encode() if token else b""
        self._hint = hint

    @property
    def required(self) -> bool:
        return bool(self._expected)

    def check(self, authorization: str) -> None:
        """Raises Unauthenticated unless `authorization` is exactly 'Bearer <token>'."""
        if not self._expected:
            return
        # Constant time: how much of a guess matched must not show in the reply's timing.
        if not hmac.compare_digest(authorization.encode(), self._expected):
            raise Unauthenticated(self._hint)
