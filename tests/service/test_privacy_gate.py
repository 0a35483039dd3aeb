"""Every byte that leaves passes one gate, whatever field it came in: the attacks that got
personal data to the cloud (labels, example labels, schema descriptions, enum values and
property names, instructions, a value split across messages, obfuscated forms), through a
real gRPC daemon and the HTTP API, under AUTO and CLOUD_ONLY, redaction on and off.

The oracle is the loopback cloud's record of every byte it received: the secret must not
be in it in any form (as sent, JSON-escaped, percent-encoded, or folded: NFKC, no
zero-width characters, separators removed).
"""

from __future__ import annotations

import json
import re
import unicodedata
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from fake_cloud import Script, fake_cloud, ok

from sidecar.router.outbound import _strings

CARD = "4929 7351 8862 0448"  # passes Luhn
EMAIL = "zoe.quint@maplehollow.org"
IBAN = "DE89 3704 0044 0532 0130 00"
PHONE = "01 23 45 67 89"  # a Paris number
LABELS = ["card_arrival", "exchange_rate"]
ZW, NBSP = "\u200b", "\u00a0"


@pytest.fixture
def cloud() -> Iterator[tuple[str, Script]]:
    with fake_cloud() as c:
        yield c


def settings(url: str, redact: bool) -> dict[str, Any]:
    # Thresholds the fake local model never meets: AUTO always wants to escalate.
    return {"base_url": url, "model": "m", "backoff_seconds": 0.01, "retries": 0,
            "timeout_seconds": 2.0, "redact": redact, "classify_threshold": 0.999,
            "extract_mean_logprob": 0.0, "generate_mean_logprob": 0.0}  # fmt: skip


def _fold(s: str) -> str:
    s = urllib.parse.unquote(unicodedata.normalize("NFKC", s))
    s = "".join(c for c in s if unicodedata.category(c) not in ("Cf", "Mn"))
    return re.sub(r"[\s\-._/,]+", "", s.replace("\uff20", "@").replace("\u3002", ".")).lower()


def leaked(script: Script, secret: str) -> bool:
    """Whether any form of `secret` reached the cloud."""
    raw = bytes(script.raw)
    forms = {secret, json.dumps(secret)[1:-1], urllib.parse.quote(secret)}
    if any(f.encode() in raw for f in forms):
        return True
    core = _fold(secret)
    pieces = [core]
    if "@" in secret:  # half an address is still an address
        pieces = [_fold(x) for x in secret.split("@")]
    digits = re.sub(r"\D", "", secret)
    for s in (s for body in script.received for s in _strings(body)):
        f = _fold(s)
        if any(p and p in f for p in pieces):
            return True
        if len(digits) >= 9 and digits[-9:] in re.sub(r"\D", "", f):
            return True
    return False


Call = Callable[[Any, str], Awaitable[Any]]


@dataclass(frozen=True)
class Attack:
    id: str
    call: Call
    secret: str
    reply: str  # what the cloud answers (to the redacted request)
    kind: str
    label: str | None = None  # the caller's label a redacted answer must map back to
    leaves: bool = True  # False: the field is never part of a cloud request at all
    sure: bool = False  # the local answer is sure (examples): AUTO has no reason to escalate


def classify(text: str, labels: list[str] | None = None, **kw: Any) -> Call:
    return lambda c, routing: c.classify(text, labels or [], routing=routing, **kw)


def extract(text: str, schema: dict[str, Any], **kw: Any) -> Call:
    return lambda c, routing: c.extract(text, schema, routing=routing, **kw)


def chat(messages: list[tuple[str, str]]) -> Call:
    return lambda c, routing: c.chat(messages, max_tokens=4, routing=routing)


def generate(prompt: str) -> Call:
    return lambda c, routing: c.generate(prompt, max_tokens=4, routing=routing)


OBJ = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
ROWS = [("where is my new card", "card_arrival"), ("my card has not arrived", "card_arrival"),
        ("what is the exchange rate", "exchange_rate"), ("rate for euros", "exchange_rate")]  # fmt: skip

ATTACKS = [
    Attack("classify labels", classify("who do I write to", ["card_arrival", f"contact {EMAIL}"]),
           EMAIL, "contact [EMAIL]", "email", label=f"contact {EMAIL}"),
    Attack("classify labels full-width at",
           classify("who do I write to", ["card_arrival", EMAIL.replace("@", "\uff20")]),
           EMAIL, "[EMAIL]", "email", label=EMAIL.replace("@", "\uff20")),
    Attack("classify instruction", classify("where is it", LABELS,
           instruction=f"The customer's card is {CARD.replace(' ', NBSP)}."),
           CARD, "card_arrival", "card"),
    Attack("classify text card with dots", classify(f"card {CARD.replace(' ', '.')} lost", LABELS),
           CARD, "card_arrival", "card"),
    Attack("classify text percent-encoded email",
           classify(f"mail {EMAIL.replace('@', '%40')} now", LABELS), EMAIL, "card_arrival", "email"),
    Attack("classify example labels",
           classify("please write", examples=[*ROWS, ("write to me", EMAIL), ("mail me", EMAIL)]),
           EMAIL, "[EMAIL]", "email", label=EMAIL, sure=True),
    Attack("classify example texts never leave",
           classify("where is my card", examples=[*ROWS, (f"card {CARD}", "card_arrival")]),
           CARD, "card_arrival", "card", leaves=False, sure=True),
    Attack("extract schema description",
           extract("Ann wrote", {**OBJ, "description": f"from {EMAIL.replace('@', ' @ ')}"}),
           EMAIL, '{"name": "Ann"}', "email"),
    Attack("extract schema enum value",
           extract("Ann wrote", {"type": "object", "required": ["to"],
                                 "properties": {"to": {"enum": ["nobody", EMAIL]}}}),
           EMAIL, '{"to": "nobody"}', "email"),
    Attack("extract schema property name",
           extract("Ann wrote", {"type": "object", "required": [EMAIL],
                                 "properties": {EMAIL: {"type": "string"}}}),
           EMAIL, '{"[EMAIL]": "yes"}', "email"),
    Attack("extract instruction lower-case iban",
           extract("Ann wrote", OBJ, instruction=f"Pay to {IBAN.lower()}."),
           IBAN, '{"name": "Ann"}', "iban"),
    Attack("chat card split across messages",
           chat([("user", f"my card is {CARD[:9]}"), ("user", f"{CARD[10:]} thanks")]),
           CARD, "ok", "card"),
    Attack("chat email split across system and user",
           chat([("system", "Reply to zoe.quint@"), ("user", "maplehollow.org please")]),
           EMAIL, "ok", "email"),
    Attack("chat zero-width email", chat([("user", f"I am {EMAIL.replace('@', ZW + '@' + ZW)}")]),
           EMAIL, "ok", "email"),
    Attack("generate national phone", generate(f"call {PHONE} tomorrow"), PHONE, "ok", "phone"),
    Attack("generate iban with double spaces",
           generate(f"pay {IBAN.replace(' ', '  ')}"), IBAN, "ok", "iban"),
]  # fmt: skip


async def code_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    return e.value.code(), e.value.details() or ""


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.id for a in ATTACKS])
async def test_without_redaction_nothing_sensitive_leaves(serve, tiny_model, cloud, attack) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.default = ok(attack.reply)
    s = await serve(tiny_model, cloud=settings(url, redact=False))
    if not attack.leaves:  # the field is not sent: the request goes, the secret does not
        r = await attack.call(s.client, "CLOUD_ONLY")
        assert r.route.served_by == "cloud"
        assert script.received and not leaked(script, attack.secret)
        return
    code, msg = await code_of(attack.call(s.client, "CLOUD_ONLY"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION, msg
    assert f"sensitive data ({attack.kind})" in msg and "never leaves" in msg
    r = await attack.call(s.client, "AUTO")  # AUTO wants the cloud, and keeps it local
    assert r.route.served_by == "local"
    assert attack.sure or "never leaves" in r.route.reason
    assert not script.raw  # not one byte reached the cloud


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.id for a in ATTACKS])
async def test_with_redaction_only_placeholders_leave(serve, tiny_model, cloud, attack) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.default = ok(attack.reply)
    s = await serve(tiny_model, cloud=settings(url, redact=True))
    for routing in ("CLOUD_ONLY", "AUTO"):
        r = await attack.call(s.client, routing)
        if attack.sure and routing == "AUTO":
            assert r.route.served_by == "local"
            continue
        assert r.route.served_by == "cloud", (routing, r.route.reason)
        if attack.label is not None:  # the placeholder answer names the caller's label
            assert r.label == attack.label
    assert len(script.received) >= (1 if attack.sure else 2)
    assert not leaked(script, attack.secret)
    if attack.leaves:
        assert script.seen(f"[{attack.kind.upper()}]")


async def test_a_redacted_property_name_is_put_back_in_the_answer(serve, tiny_model, cloud) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.default = ok('{"[EMAIL]": "yes"}')
    s = await serve(tiny_model, cloud=settings(url, redact=True))
    schema = {"type": "object", "properties": {EMAIL: {"type": "string"}}, "required": [EMAIL]}
    r = await s.client.extract("Ann wrote", schema, routing="CLOUD_ONLY")
    assert json.loads(r.json) == {EMAIL: "yes"} and not leaked(script, EMAIL)


def test_the_oracle_sees_obfuscated_forms() -> None:
    """The leak check must itself be able to fail."""
    script = Script()
    for sent in [CARD.replace(" ", "."), EMAIL.replace("@", "\uff20"), IBAN.lower()]:
        script.received = [{"messages": [{"role": "user", "content": f"x {sent} y"}]}]
        assert leaked(script, {"4": CARD, "z": EMAIL, "d": IBAN}[sent[0]])
    script.received = [{"messages": [{"role": "user", "content": "x [CARD] y"}]}]
    assert not leaked(script, CARD)


# ------------------------------------------------------------------ over HTTP


async def test_the_http_api_passes_the_same_gate(serve, tiny_model, cloud, short_dir) -> None:  # type: ignore[no-untyped-def]
    import openai
    from openai_client import unix_client  # type: ignore[import-not-found]

    url, script = cloud
    script.default = ok('{"to": "nobody"}')
    split = [{"role": "system", "content": "Card on file: " + CARD[:9]},
             {"role": "user", "content": CARD[10:] + " is it blocked?"}]  # fmt: skip
    schema = {"type": "object", "required": ["to"],
              "properties": {"to": {"enum": ["nobody", EMAIL.replace("@", "%40")]}}}  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    for redact, sock in ((False, "h1.sock"), (True, "h2.sock")):
        await serve(tiny_model, cloud=settings(url, redact=redact),
                    http={"socket": str(short_dir / sock)}, socket=short_dir / f"g{sock}")  # fmt: skip
        client = unix_client(short_dir / sock)
        try:
            for routing in ("CLOUD_ONLY", "AUTO"):
                body = {"sidecar_routing": routing}
                for msgs, extra in ((split, {}), ([{"role": "user", "content": "hi"}],
                                                  {"response_format": fmt})):  # fmt: skip
                    if not redact and routing == "CLOUD_ONLY":
                        with pytest.raises(openai.BadRequestError, match="never leaves"):
                            await client.chat.completions.create(
                                model="default", messages=msgs, max_tokens=4,
                                extra_body=body, **extra)  # fmt: skip
                        continue
                    r = await client.chat.completions.create(
                        model="default", messages=msgs, max_tokens=4, extra_body=body, **extra
                    )  # fmt: skip
                    who = r.model_extra["sidecar"]["served_by"]  # type: ignore[index]
                    assert who == ("cloud" if redact else "local"), (redact, routing)
        finally:
            await client.close()
        if not redact:
            assert not script.raw
    assert script.received and not leaked(script, CARD) and not leaked(script, EMAIL)


# ------------------------------------------------------------------ the last check


async def test_the_client_refuses_a_payload_the_decision_missed(serve, tiny_model, cloud) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.default = ok("card_arrival")
    s = await serve(tiny_model, cloud=settings(url, redact=False))
    gate = s.running.router.gate

    async def blind(_out: Any) -> list[str]:  # an upstream scan that misses everything
        return []

    gate.kinds_async = blind
    text = f"mail {EMAIL} about my card"
    code, msg = await code_of(s.client.classify(text, LABELS, routing="CLOUD_ONLY"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "never leaves" in msg
    r = await s.client.classify(text, LABELS, routing="AUTO")
    assert r.route.served_by == "local" and r.route.reason_code == "blocked"
    assert not script.raw
    gate.update(gate.scanner, redact=True)  # with redaction on, the last check redacts instead
    r = await s.client.classify(text, LABELS, routing="CLOUD_ONLY")
    assert r.route.served_by == "cloud" and script.seen("[EMAIL]")
    assert not leaked(script, EMAIL)


async def test_the_cloud_client_alone_never_sends_sensitive_data(cloud) -> None:  # type: ignore[no-untyped-def]
    from sidecar.router.breaker import Breaker
    from sidecar.router.cloud import CloudClient, CloudEndpoint
    from sidecar.router.outbound import Gate, SensitiveData
    from sidecar.router.privacy import Scanner

    url, script = cloud
    cfg = CloudEndpoint(base_url=url, model="m", retries=0)
    c = CloudClient(cfg, Breaker(3, 60), {})
    schema = {"type": "object", "properties": {"to": {"enum": [EMAIL]}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(SensitiveData, match="email"):
        await c.chat([{"role": "user", "content": "hi"}], response_format=fmt)
    with pytest.raises(SensitiveData, match="card"):
        await c.chat(
            [{"role": "system", "content": CARD[:9]}, {"role": "user", "content": CARD[10:]}]
        )
    assert not script.raw
    await c.close()
    c = CloudClient(cfg, Breaker(3, 60), {}, Gate(Scanner(), redact=True))
    await c.chat([{"role": "user", "content": f"card {CARD}"}], response_format=fmt)
    assert script.seen("[CARD]") and script.seen("[EMAIL]")
    assert not leaked(script, CARD) and not leaked(script, EMAIL)
    await c.close()
