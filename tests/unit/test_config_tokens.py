"""Bearer tokens in the config: a blank one must not pass for a set one (issue 12)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import Overrides, load
from sidecar.domain.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("toml", "env", "key"),
    [
        ('[http]\nport = 8080\ntoken = "   "', {}, "http.token"),
        ('[http]\nsocket = "/tmp/h.sock"\ntoken = "\\t"', {}, "http.token"),
        ("", {"SIDECAR_HTTP_PORT": "8080", "SIDECAR_HTTP_TOKEN": " \n "}, "http.token"),
        ('[server]\ntcp_port = 7000\ntcp_token = "  "', {}, "server.tcp_token"),
        ("", {"SIDECAR_SERVER_TCP_TOKEN": "\u00a0"}, "server.tcp_token"),
        # Surrounding whitespace can never match: HTTP and gRPC strip it from header values.
        ('[http]\nport = 8080\ntoken = " secret"', {}, "http.token"),
        ('[server]\ntcp_port = 7000\ntcp_token = "secret\\n"', {}, "server.tcp_token"),
    ],
)
def test_a_blank_or_padded_token_is_refused_naming_the_key(
    tmp_path: Path, toml: str, env: dict[str, str], key: str
) -> None:
    with pytest.raises(ConfigError) as e:
        load(Overrides(config=write(tmp_path, toml)), env=env)
    assert e.value.key == key
    assert "blank" in e.value.problem or "whitespace" in e.value.problem


def test_real_tokens_and_no_token_still_load(tmp_path: Path) -> None:
    cfg = load(
        Overrides(config=write(tmp_path, '[server]\ntcp_port = 7000\ntcp_token = "a b-c"')),
        env={"SIDECAR_HTTP_PORT": "8080", "SIDECAR_HTTP_TOKEN": "s3cret"},
    )
    assert cfg.server.tcp_token == "a b-c" and cfg.http.token == "s3cret"
    assert load(Overrides(config=write(tmp_path, "")), env={}).http.token == ""
