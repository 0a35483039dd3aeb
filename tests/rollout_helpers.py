"""What the staged-rollout tests share: the statistics of a fair hash, and a manifest signed
over whatever a (buggy or hostile) publisher put in it."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sidecar.update.manifest import canonical, key_id


def within_binomial(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    """`count` of `n` is what a uniform hash gives at share `p`: within `sigmas` standard
    deviations of Binomial(n, p) (4: a fair hash misses by chance about once in 16,000
    such checks, while one that ignored the fraction, or read the wrong bytes, is far out)."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


def signed_over(signed: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    """A manifest validly signed over exactly `signed`, whatever it holds."""
    sig = base64.b64encode(key.sign(canonical(signed))).decode()
    doc = {"signed": signed, "signatures": [{"keyid": key_id(key.public_key()), "sig": sig}]}
    return json.dumps(doc).encode()
