"""The detector bypasses found by attacking the daemon, kept as a corpus: every written form
of a card, e-mail, IBAN and phone number below must be found (and redacted away
completely), and the look-alikes (dates, versions, amounts, order numbers) must not."""

from __future__ import annotations

import pytest

from sidecar.router.privacy import Scanner, normalise

CARD = "4111 1111 1111 1111"
NBSP, THIN, NNBSP, ZW, ZWJ = "\u00a0", "\u2009", "\u202f", "\u200b", "\u200d"


def fullwidth(s: str) -> str:
    return "".join(c if c == " " else chr(ord(c) + 0xFEE0) for c in s)


def spaced(sep: str, groups: tuple[str, ...] = ("4111", "1111", "1111", "1111")) -> str:
    return sep.join(groups)


CARDS = {
    "dots": spaced("."),
    "slashes": spaced("/"),
    "underscores": spaced("_"),
    "double spaces": spaced("  "),
    "nbsp": spaced(NBSP),
    "thin spaces": spaced(THIN),
    "narrow nbsp": spaced(NNBSP),
    "tabs": spaced("\t"),
    "newlines": spaced("\n"),
    "crlf": spaced("\r\n"),
    "spaced dashes": spaced(" - "),
    "en dashes": spaced("\u2013"),
    "zero-width inside a group": "4" + ZW + "111 1111 1111 1111",
    "zero-width between groups": spaced(ZW),
    "zero-width joiners everywhere": ZWJ.join("4111111111111111"),
    "commas": spaced(","),
    "comma space": spaced(", "),
    "glued prefix": "ref-4111111111111111",
    "glued letters": "ref4111111111111111",
    "trailing dash": spaced("-") + "-",
    "full-width digits": fullwidth("4111 1111 1111 1111"),
    "percent-encoded spaces": spaced("%20"),
    "amex 4-6-5": "3782 822463 10005",
    "mastercard": "5500 0055 5555 5559",
    "soft hyphens": spaced("\u00ad"),
}

EMAILS = {
    "full-width at": "ann.lee\uff20example.com",
    "small at": "ann.lee\ufe6bexample.com",
    "idn domain": "jurgen@bücher.de",
    "idn local part": "jürgen@example.com",
    "idn all": "用户@例子.广告",
    "no tld": "ann.lee@localhost",
    "ip literal": "ann@[192.168.0.1]",
    "ipv6 literal": "ann@[IPv6:2001:db8::1]",
    "bare ip": "ann@192.168.0.1",
    "quoted local part": '"ann lee"@example.com',
    "spaces around at": "ann.lee @ example.com",
    "space after at": "ann.lee@ example.com",
    "double space before at": "ann.lee  @example.com",
    "zero-width in domain": "ann.lee@exa" + ZW + "mple.com",
    "zero-width before at": "ann.lee" + ZW + "@example.com",
    "percent-encoded at": "ann.lee%40example.com",
    "percent-encoded everything": "%61%6e%6e%40%65%78%61%6d%70%6c%65%2e%63%6f%6d",
    "ideographic dot": "ann.lee@example\u3002com",
    "full-width dot": "ann.lee@example\uff0ecom",
    "upper case": "ANN.LEE@EXAMPLE.COM",
    "plus tag": "ann+shop@example.co.uk",
    "full-width everything": fullwidth("ann@example.com"),
}

IBANS = {
    "lower case": "de89 3704 0044 0532 0130 00",
    "dashes": "DE89-3704-0044-0532-0130-00",
    "double spaces": "DE89  3704  0044  0532  0130  00",
    "nbsp": NBSP.join(["DE89", "3704", "0044", "0532", "0130", "00"]),
    "zero-width": ZW.join(["DE89", "3704", "0044", "0532", "0130", "00"]),
    "gb lower": "gb82 west 1234 5698 7654 32",
    "fr with letters": "FR14 2004 1010 0505 0001 3M02 606",
    "glued to a dash": "iban:DE89370400440532013000",
}

PHONES = {
    "us parentheses": "(415) 555-2671",
    "us dashes": "415-555-2671",
    "us dots": "415.555.2671",
    "us with 1": "1-415-555-2671",
    "us international": "+1 415 555 2671",
    "e164 us": "+14155552671",
    "e164 de": "+4915112345678",
    "fr international": "+33 1 23 45 67 89",
    "fr national": "01 23 45 67 89",
    "fr mobile": "06 12 34 56 78",
    "fr dotted": "01.23.45.67.89",
    "fr 00 prefix": "0033 1 23 45 67 89",
    "de national": "030 12345678",
    "de grouped": "030 1234 5678",
    "de slash": "030/1234567",
    "de mobile": "0170 1234567",
    "de international with (0)": "+49 (0)30 1234 5678",
    "gb international": "+44 20 7946 0958",
    "gb national": "020 7946 0958",
    "nbsp grouped": NBSP.join(["+33", "1", "23", "45", "67", "89"]),
}

CORPUS = (
    [("card", k, v) for k, v in CARDS.items()]
    + [("email", k, v) for k, v in EMAILS.items()]
    + [("iban", k, v) for k, v in IBANS.items()]
    + [("phone", k, v) for k, v in PHONES.items()]
)


@pytest.mark.parametrize(("kind", "value"), [(k, v) for k, _, v in CORPUS],
                         ids=[f"{k}: {name}" for k, name, _ in CORPUS])  # fmt: skip
def test_every_written_form_is_found_and_redacted_away(kind: str, value: str) -> None:
    s = Scanner()
    text = f"hello, please use {value} for it, thanks"
    assert s.kinds([text]) == [kind]
    (redacted,) = s.redact_all([text])
    head, tail = "hello, please use ", " for it, thanks"
    assert redacted.startswith(head) and redacted.endswith(tail)
    left = redacted[len(head) : -len(tail)]  # only a glued-on word may stay (`ref-`)
    assert f"[{kind.upper()}]" in left and len(left) <= len(kind) + 2 + 5, left
    assert s.kinds([redacted]) == []


@pytest.mark.parametrize(
    ("parts", "kind"),
    [
        (["my card is 4111 1111", "1111 1111, thanks"], "card"),
        (["my card is 4111 1111 ", " 1111 1111"], "card"),
        (["write to ann.lee@", "example.com"], "email"),
        (["write to ann.lee", "@example.com"], "email"),
        (["iban DE89 3704 0044", "0532 0130 00"], "iban"),
    ],
    ids=["card", "card with spaces", "email after at", "email before at", "iban"],
)
def test_a_value_split_across_parts_is_found_and_redacted_in_each(
    parts: list[str], kind: str
) -> None:
    s = Scanner()
    assert s.kinds(parts) == [kind]
    redacted = s.redact_all(parts)  # every piece of it is taken out
    assert all(f"[{kind.upper()}]" in r for r in redacted)
    assert s.kinds(redacted) == []


LOOKALIKES = [
    "version 1.2.3 released on 2024-05-01",
    "on 2024-05-01 12:30 we shipped build 2024.05.01",
    "dates 2024-05-01, 2024-06-01 and 01/07/2024",
    "the meeting is at 10:30 on 01.05.2024",
    "order 4111 1111 1111 1112 (fails Luhn)",
    "tracking 1234567890123",
    "order number 4111111111111112",
    "total 1,234,567.89 EUR",
    "amount 12 345 678,90 EUR",
    "amount $ 9,999,999.99",
    "ISBN 978-3-16-148410-0",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "npm i lodash@4.17.21 and @types/node",
    "meet me @ 5pm at the cafe",
    "use @property on the getter",
    "ping 192.168.0.1 and 10.0.0.1",
    "room 101, floor 3, 20 people, ext. 1234",
    "invoice INV-2024-000123",
    "python -m pip install x==1.2.3",
    "pay to DE89 3704 0044 0532 0130 01",  # IBAN checksum fails
    "the IBAN field is empty and de is a language code",
    "serial 1234 5678 9012 3456",  # starts with 1: no card does
    "my card arrived late and the app says pending",
]


@pytest.mark.parametrize("text", LOOKALIKES)
def test_look_alikes_are_not_sensitive(text: str) -> None:
    assert Scanner().kinds([text]) == []


def test_the_same_value_gets_the_same_placeholder_and_others_are_numbered() -> None:
    s = Scanner()
    text = "a@x.com wrote to b@y.com, then A@X.COM again"
    (out,) = s.redact_all([text])
    assert out == "[EMAIL] wrote to [EMAIL_2], then [EMAIL] again"


def test_normalise_maps_back_to_the_original_offsets() -> None:
    text = "x " + fullwidth("ann@") + "ex%41mple.com" + ZW + " y"
    n = normalise(text)
    assert n.text == "x ann@exAmple.com y"
    a = n.text.index("ann")
    b = n.text.index(".com") + 4
    assert n.span(a, b) == (2, text.index(ZW))  # the escape maps back to its three chars
    assert normalise("plain ascii").text == "plain ascii"


def test_a_long_text_scans_in_linear_time() -> None:
    import time

    s = Scanner()
    hostile = ["a" * 50_000, "@" * 20_000, "1 " * 20_000, "a@" * 10_000, "de00 " * 5_000]
    for text in hostile:
        t0 = time.perf_counter()
        s.kinds([text])
        assert time.perf_counter() - t0 < 2.0, text[:10]
