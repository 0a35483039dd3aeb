"""The routing decision, table-tested: (request, local outcome, breaker, budget, sensitivity)."""

from __future__ import annotations

import pytest

from sidecar.router.policy import Decision, LocalOutcome, Situation, decide

SURE = LocalOutcome(confidence=0.9, threshold=0.6)
UNSURE = LocalOutcome(confidence=0.4, threshold=0.6)
DOWN = LocalOutcome(failure="unavailable")
FULL = LocalOutcome(failure="overloaded")
# A confident local label for a text none of the labels cover.
STRANGE = LocalOutcome(confidence=0.95, threshold=0.6, out_of_scope=True, novelty=0.97)


@pytest.mark.parametrize(
    ("situation", "action", "reason", "fail"),
    [
        # LOCAL_ONLY never escalates, whatever happens.
        (Situation("LOCAL_ONLY"), "local", "", None),
        (Situation("LOCAL_ONLY", local=UNSURE), "keep_local", "", None),
        # CLOUD_ONLY goes to the cloud, or fails fast with the reason.
        (Situation("CLOUD_ONLY"), "cloud", "routing CLOUD_ONLY", None),
        (Situation("CLOUD_ONLY", breaker_open=True), "fail", "breaker is open", "unavailable"),
        (Situation("CLOUD_ONLY", spent="daily"), "fail", "daily cloud budget", "overloaded"),
        (Situation("CLOUD_ONLY", cloud=False), "fail", "no cloud", "failed_precondition"),
        (
            Situation("CLOUD_ONLY", sensitive=("email",)),
            "fail",
            "sensitive data (email)",
            "failed_precondition",
        ),
        # AUTO runs locally first...
        (Situation("AUTO"), "local", "", None),
        # ...unless a pre-routing rule says otherwise (and the cloud may be used).
        (Situation("AUTO", pre_route="prompt over 2000 tokens"), "cloud", "pre-routed", None),
        (Situation("AUTO", pre_route="x", breaker_open=True), "local", "", None),
        # AUTO keeps a sure local answer.
        (Situation("AUTO", local=SURE), "keep_local", "", None),
        # AUTO escalates an unsure one, a failure and an overload, naming why.
        (
            Situation("AUTO", local=UNSURE),
            "cloud",
            "low local confidence: confidence 0.400 < 0.600",
            None,
        ),
        (Situation("AUTO", local=DOWN), "cloud", "local unavailable", None),
        (Situation("AUTO", local=FULL), "cloud", "local overloaded", None),
        # Escalation blocked: keep the unsure local answer and say why...
        (Situation("AUTO", local=UNSURE, breaker_open=True), "keep_local", "breaker is open", None),
        (
            Situation("AUTO", local=UNSURE, spent="monthly"),
            "keep_local",
            "monthly cloud budget",
            None,
        ),
        (
            Situation("AUTO", local=UNSURE, sensitive=("card",)),
            "keep_local",
            "sensitive data (card)",
            None,
        ),
        # Out of scope escalates whatever the confidence, naming the novelty...
        (Situation("AUTO", local=STRANGE), "cloud", "out of scope: novelty 0.970", None),
        # ...and when the cloud is blocked the local answer stands, saying why.
        (
            Situation("AUTO", local=STRANGE, breaker_open=True),
            "keep_local",
            "out of scope: novelty 0.970; escalation blocked: the cloud circuit breaker",
            None,
        ),
        (
            Situation("AUTO", local=STRANGE, spent="daily"),
            "keep_local",
            "out of scope: novelty 0.970; escalation blocked: the daily cloud budget",
            None,
        ),
        (
            Situation("AUTO", local=STRANGE, sensitive=("marked",)),
            "keep_local",
            "out of scope: novelty 0.970; escalation blocked: sensitive data (marked)",
            None,
        ),
        (Situation("AUTO", local=STRANGE, cloud=False), "keep_local", "", None),
        (Situation("LOCAL_ONLY", local=STRANGE), "keep_local", "", None),
        # ...but with no cloud configured AUTO is LOCAL_ONLY: nothing mentions escalation.
        (Situation("AUTO", local=UNSURE, cloud=False), "keep_local", "", None),
        (Situation("AUTO", local=DOWN, cloud=False), "keep_local", "", None),
        (Situation("AUTO", pre_route="x", cloud=False), "local", "", None),
        # ...but with no local answer at all, the local failure is the error.
        (
            Situation("AUTO", local=DOWN, breaker_open=True),
            "fail",
            "local unavailable; escalation blocked",
            "unavailable",
        ),
        (
            Situation("AUTO", local=DOWN, sensitive=("marked",)),
            "fail",
            "never leaves the machine",
            "unavailable",
        ),
    ],
)
def test_decide(situation: Situation, action: str, reason: str, fail: str | None) -> None:
    d = decide(situation)
    assert d.action == action
    assert reason in d.reason if reason else d.reason == ""
    assert d.fail == fail


def test_redaction_lets_sensitive_requests_escalate_redacted() -> None:
    d = decide(Situation("AUTO", local=UNSURE, sensitive=("email",), redact=True))
    assert d == Decision(
        "cloud",
        "low local confidence: confidence 0.400 < 0.600",
        redact=True,
        code="low_confidence",
    )
    plain = decide(Situation("AUTO", local=UNSURE))
    assert not plain.redact


def test_a_request_marked_sensitive_never_leaves_even_with_redaction() -> None:
    # Redaction can only remove what the detectors find; a caller's mark covers everything.
    d = decide(Situation("AUTO", local=UNSURE, sensitive=("marked", "email"), redact=True))
    assert d.action == "keep_local" and "never leaves the machine" in d.reason
    d = decide(Situation("CLOUD_ONLY", sensitive=("marked",), redact=True))
    assert d.action == "fail" and d.fail == "failed_precondition"


@pytest.mark.parametrize(
    ("outcome", "code"),
    [
        (UNSURE, "low_confidence"),
        (DOWN, "local_unavailable"),
        (FULL, "local_overloaded"),
        (STRANGE, "out_of_scope"),
    ],
)
def test_each_escalation_has_a_fixed_code_for_metrics(outcome: LocalOutcome, code: str) -> None:
    assert decide(Situation("AUTO", local=outcome)).code == code


def test_local_errors_map_to_escalation_triggers_by_class() -> None:
    from sidecar.domain import errors
    from sidecar.router.engine import failure_kind

    cases = {
        errors.ContextOverflow("too long"): "context",
        errors.SchemaViolation("JSON missed the schema"): "schema",
        errors.Overloaded("queue full"): "overloaded",
        errors.WorkerCrashed("died"): "unavailable",
        errors.Unavailable("starting"): "unavailable",
        errors.DeadlineExceeded("slow"): "timeout",
        errors.InvalidRequest("empty prompt"): None,  # the caller's fault: never escalated
        errors.OutOfRange("too many labels"): None,
        errors.FailedPrecondition("no model"): None,
    }
    for error, kind in cases.items():
        assert failure_kind(error) == kind, error
        # The same class survives the worker pipe (errors cross it as kind + message).
        again = errors.from_kind(error.kind, error.message)
        assert type(again) is type(error) and failure_kind(again) == kind


def test_out_of_scope_blocked_is_counted_as_blocked_and_redacts_when_allowed() -> None:
    blocked = decide(Situation("AUTO", local=STRANGE, breaker_open=True))
    assert blocked.code == "blocked"
    d = decide(Situation("AUTO", local=STRANGE, sensitive=("email",), redact=True))
    assert d == Decision("cloud", "out of scope: novelty 0.970", redact=True, code="out_of_scope")


def test_out_of_scope_without_a_measured_novelty_still_names_the_reason() -> None:
    d = decide(Situation("AUTO", local=LocalOutcome(confidence=0.9, out_of_scope=True)))
    assert (d.action, d.reason, d.code) == ("cloud", "out of scope", "out_of_scope")


def test_a_local_failure_not_escalated_carries_the_cause_of_the_block() -> None:
    assert decide(Situation("AUTO", local=DOWN, sensitive=("marked",))).cause == "sensitive"
    assert decide(Situation("AUTO", local=DOWN, breaker_open=True)).cause == "breaker"
