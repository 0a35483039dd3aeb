"""The cloud's side of "none of these": offered in the prompt only with allow_none, and
its answer mapped to NONE only then (without it, "none" is no label)."""

from __future__ import annotations

import pytest

from sidecar.domain.types import ClassifyTask
from sidecar.router.cloud import NONE, match_label
from sidecar.router.outbound import NONE_ANSWER, build

LABELS = ["card_arrival", "lost_or_stolen_card"]


@pytest.mark.parametrize(
    ("answer", "allowed", "expected"),
    [
        ("none of these", True, NONE),
        ("None of these.", True, NONE),
        ("`none`", True, NONE),
        ("none of these", False, None),
        ("none", False, None),
        ("card_arrival", True, "card_arrival"),  # a label is still a label
        ("Lost or stolen card", True, "lost_or_stolen_card"),
        ("I cannot tell", True, None),
    ],
)
def test_match_label_with_and_without_allow_none(
    answer: str, allowed: bool, expected: str | None
) -> None:
    assert match_label(answer, LABELS, allow_none=allowed) == expected


def test_a_label_named_none_wins_over_the_none_answer() -> None:
    assert match_label("none", ["none", "card_arrival"], allow_none=True) == "none"


def test_the_prompt_offers_none_only_when_allowed() -> None:
    plain = build(ClassifyTask("hi", tuple(LABELS))).render()[0]["content"]
    allowed = build(ClassifyTask("hi", tuple(LABELS), allow_none=True)).render()[0]["content"]
    assert NONE_ANSWER not in plain
    assert f"answer {NONE_ANSWER}" in allowed
    assert allowed.startswith(plain.removesuffix("Answer with the label only."))


def test_a_redacted_request_keeps_the_none_answer_on_offer() -> None:
    from sidecar.router.outbound import Gate
    from sidecar.router.privacy import Scanner

    out = build(ClassifyTask("mail ann.lee@example.com", tuple(LABELS), allow_none=True))
    red = Gate(Scanner(), redact=True).redacted(out)
    assert red is not out and "ann.lee@example.com" not in red.text
    assert red.allow_none and NONE_ANSWER in red.render()[0]["content"]
