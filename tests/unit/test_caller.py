from __future__ import annotations

from typing import Any

import pytest

from sidecar.calls.callers import Bearer, caller_key, token_caller
from sidecar.domain.errors import Unauthenticated
from sidecar.server.caller import caller_of
from sidecar.server.peercred import parse_peer


class Ctx:
    def __init__(self, peer: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._peer = peer
        self._md = metadata

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> Any:
        return self._md


RELAYED = "unix-abstract:sidecar-peer/100/1000/4242/7"


def test_relayed_peer_names_carry_uid_and_pid() -> None:
    assert parse_peer(RELAYED) == (1000, 4242)
    for other in (
        "unix:",
        "ipv4:127.0.0.1:5000",
        "unix-abstract:sidecar-peer/1/x/2/3",
        "unix-abstract:else",
    ):
        assert parse_peer(other) is None


def test_socket_callers_are_told_apart_by_process() -> None:
    assert caller_of(Ctx(RELAYED)) == "uid:1000/pid:4242"
    assert caller_of(Ctx(RELAYED.replace("4242", "4243"))) == "uid:1000/pid:4243"


def test_declared_app_name_refines_but_stays_within_the_uid() -> None:
    assert caller_of(Ctx(RELAYED, (("x-sidecar-caller", "billing"),))) == "uid:1000/app:billing"
    other_uid = RELAYED.replace("/1000/", "/1001/")
    assert caller_of(Ctx(other_uid, (("x-sidecar-caller", "billing"),))) == "uid:1001/app:billing"


def test_tcp_callers_are_told_apart_by_token() -> None:
    a = caller_of(Ctx("ipv4:127.0.0.1:1", (("authorization", "Bearer a"),)))
    b = caller_of(Ctx("ipv4:127.0.0.1:2", (("authorization", "Bearer b"),)))
    assert a != b and a.startswith("token:")


def test_a_bearer_check_takes_the_exact_token_only() -> None:
    check = Bearer("s3cret", "send it").check
    check("Bearer s3cret")
    for wrong in (
        "",
        "s3cret",
        "Bearer s3cre",
        "Bearer s3cretX",
        "bearer s3cret",
        "Bearer  s3cret",
    ):
        with pytest.raises(Unauthenticated, match="send it"):
            check(wrong)
    Bearer("", "unused").check("anything")  # no token configured: nothing is asked


def test_without_kernel_credentials_the_token_outranks_a_declared_name() -> None:
    assert caller_key("Bearer a", "billing", "peer:x") == token_caller("Bearer a")
    assert caller_key(None, "billing", "peer:x") == "app:billing"
    assert caller_key("", None, "peer:x") == "peer:x"
    tcp = Ctx("ipv4:127.0.0.1:1", (("authorization", "Bearer a"), ("x-sidecar-caller", "b")))
    assert caller_of(tcp) == token_caller("Bearer a")
