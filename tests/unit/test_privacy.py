"""Sensitive-data detection: what must be caught, and look-alikes that must not be."""

from __future__ import annotations

import pytest

from sidecar.router.outbound import Gate, SensitiveData
from sidecar.router.privacy import Scanner, iban_ok, luhn, redact


@pytest.mark.parametrize(
    ("text", "kinds"),
    [
        ("write to jane.doe@example.com please", ["email"]),
        ("card 4111 1111 1111 1111 was charged twice", ["card"]),
        ("card 4111-1111-1111-1111", ["card"]),
        ("my card 5500005555555559", ["card"]),
        ("order 4111 1111 1111 1112 (fails Luhn)", []),
        ("tracking 1234567890123", []),
        ("pay to DE89 3704 0044 0532 0130 00 today", ["iban"]),
        ("pay to GB82WEST12345698765432", ["iban"]),
        ("pay to DE89 3704 0044 0532 0130 01", []),  # checksum fails
        ("call +44 20 7946 0958 tomorrow", ["phone"]),
        ("call 030 1234 5678", ["phone"]),
        ("my card arrived late and the app says pending", []),
        ("version 1.2.3 released on 2024-05-01", []),
        ("email a@b.io and card 4111111111111111", ["card", "email"]),
    ],
)
def test_detection(text: str, kinds: list[str]) -> None:
    assert Scanner().kinds([text]) == kinds


def test_checksums() -> None:
    assert luhn("4111111111111111") and not luhn("4111111111111112")
    assert iban_ok("DE89370400440532013000") and not iban_ok("DE89370400440532013001")


def test_custom_patterns_and_a_bad_one() -> None:
    s = Scanner(kinds=["email"], custom=[r"\bEMP-\d{6}\b"])
    assert s.kinds(["badge EMP-123456"]) == ["custom0"]
    assert s.kinds(["call +44 20 7946 0958"]) == []  # phone detector not enabled
    with pytest.raises(ValueError, match="not a valid regex"):
        Scanner(custom=["(unclosed"])
    with pytest.raises(ValueError, match="unknown detector"):
        Scanner(kinds=["ssn"])


def test_redaction_replaces_every_span() -> None:
    text = "Jane (jane@example.com) paid with 4111 1111 1111 1111."
    s = Scanner()
    out = redact(text, s.find(text))
    assert out == "Jane ([EMAIL]) paid with [CARD]."
    assert s.kinds([out]) == []


def test_a_gate_update_enforces_new_patterns_and_redaction_at_once() -> None:
    gate = Gate(Scanner(("email",)), redact=False)
    ticket = [{"role": "user", "content": "ticket ACME-4411 from a@b.io"}]
    with pytest.raises(SensitiveData, match="email"):
        gate.check(ticket, None)
    gate.update(Scanner((), [r"ACME-\d+"]), redact=False)  # email off, a custom pattern on
    plain = [{"role": "user", "content": "mail a@b.io"}]
    assert gate.check(plain, None) == (plain, None)
    with pytest.raises(SensitiveData, match="custom0"):
        gate.check(ticket, None)
    gate.update(gate.scanner, redact=True)
    msgs, _ = gate.check(ticket, None)
    assert "ACME-4411" not in msgs[0]["content"] and gate.redact
