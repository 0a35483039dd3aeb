"""Who answers a request: a pure function of what is known, so every rule is table-tested.

`decide` is called twice per AUTO request: before running locally (pre-routing, and
whether the cloud may be used at all) and after, with the local outcome (keep it, or
escalate and why: a local failure, a Classify answer out of scope, low confidence). LOCAL_ONLY never leaves the machine; CLOUD_ONLY never runs locally.
Sensitive data never leaves unless redaction is on, and then only redacted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sidecar.domain.types import ConfiguredRouting as Routing

Action = Literal["local", "cloud", "keep_local", "fail"]
# The error a "fail" maps to (the domain error tree's kinds).
FailKind = Literal["unavailable", "overloaded", "failed_precondition"]


@dataclass(frozen=True)
class LocalOutcome:
    """What running locally gave: a failure kind, or a confidence to compare."""

    failure: str | None = None  # "unavailable", "timeout", "context", "overloaded", "schema"
    confidence: float | None = None  # comparable with the threshold (higher = surer)
    threshold: float = 0.0
    measure: str = "confidence"  # what was compared: "top probability", "mean logprob", ...
    source: str = ""  # where the threshold came from: a config key, or a fitted entry
    detail: str = ""  # the local error's message, for the reply's reason
    # Classify: the text is like none of the labels (its novelty passed the cut)
    out_of_scope: bool = False
    novelty: float | None = None


@dataclass(frozen=True)
class Situation:
    routing: Routing
    sensitive: tuple[str, ...] = ()  # kinds of personal data found, or "marked"
    redact: bool = False  # config: escalate a redacted copy of sensitive requests
    cloud: bool = True  # a cloud endpoint is configured
    breaker_open: bool = False
    spent: str | None = None  # which budget cap is used up ("daily", "monthly"), if any
    pre_route: str | None = None  # a pre-routing rule that sends this request to the cloud
    local: LocalOutcome | None = None  # None: not run yet


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str  # a named reason; "" when the local answer stands without escalation
    fail: FailKind | None = None
    redact: bool = False  # escalate the redacted text
    code: str = ""  # the reason as a short fixed label, for metrics
    cause: str = ""  # fail: what blocks the cloud ("sensitive", "no_cloud", "budget", "breaker")


def _cloud_blocked(s: Situation) -> tuple[str, FailKind, str] | None:
    """Why the cloud may not be used now, if it may not (and that as one word)."""
    if not s.cloud:
        return (
            "no cloud configured (the daemon's [cloud] section): use routing AUTO or LOCAL_ONLY",
            "failed_precondition",
            "no_cloud",
        )
    if "marked" in s.sensitive or (s.sensitive and not s.redact):
        return (
            f"sensitive data ({', '.join(s.sensitive)}) never leaves the machine",
            "failed_precondition",
            "sensitive",
        )
    if s.spent:
        return f"the {s.spent} cloud budget is spent", "overloaded", "budget"
    if s.breaker_open:
        return "the cloud circuit breaker is open", "unavailable", "breaker"
    return None


def _escalate(s: Situation, reason: str, code: str) -> Decision:
    return Decision("cloud", reason, redact=bool(s.sensitive), code=code)


def decide(s: Situation) -> Decision:
    blocked = _cloud_blocked(s)
    if s.routing == "LOCAL_ONLY":
        return Decision("local" if s.local is None else "keep_local", "")
    if s.routing == "CLOUD_ONLY":
        if blocked:
            return Decision("fail", blocked[0], blocked[1], code="blocked", cause=blocked[2])
        return _escalate(s, "routing CLOUD_ONLY", "cloud_only")
    if not s.cloud:
        # AUTO with nowhere to escalate to is LOCAL_ONLY: the local answer or error stands
        # as it is, and nothing mentions escalation, which its caller cannot act on.
        return Decision("local" if s.local is None else "keep_local", "")

    # AUTO: before running locally
    if s.local is None:
        if s.pre_route and blocked is None:
            return _escalate(s, f"pre-routed: {s.pre_route}", "pre_route")
        return Decision("local", "")

    # AUTO: after running locally
    out = s.local
    if out.failure is not None:
        why = f"local {out.failure}" + (f" ({out.detail})" if out.detail else "")
        if blocked:
            # No answer locally and none from the cloud: the local failure is the error.
            return Decision(
                "fail", f"{why}; escalation blocked: {blocked[0]}", "unavailable", code="blocked",
                cause=blocked[2],
            )  # fmt: skip
        return _escalate(s, why, f"local_{out.failure}")
    if out.out_of_scope:
        # A confident label for a text none of the labels cover is still wrong: asked
        # first, before the confidence, whose "sure" means "sure among these labels".
        novelty = "" if out.novelty is None else f": novelty {out.novelty:.3f}"
        why = f"out of scope{novelty}"
        if blocked:
            return Decision(
                "keep_local", f"{why}; escalation blocked: {blocked[0]}", code="blocked"
            )
        return _escalate(s, why, "out_of_scope")
    if out.confidence is not None and out.confidence < out.threshold:
        why = f"low local confidence: {out.measure} {out.confidence:.3f} < {out.threshold:.3f}"
        if blocked:
            return Decision(
                "keep_local", f"{why}; escalation blocked: {blocked[0]}", code="blocked"
            )
        return _escalate(s, why, "low_confidence")
    return Decision("keep_local", "")
