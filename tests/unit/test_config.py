from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import Overrides, load
from sidecar.domain.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def test_defaults_without_file_give_private_socket_and_no_models(tmp_path: Path) -> None:
    cfg = load(Overrides(config=write(tmp_path, "")), env={})
    assert cfg.models == ()
    assert cfg.server.socket.name == "sidecar.sock"
    assert cfg.server.socket_mode == 0o600
    assert cfg.server.tcp_port == 0
    assert cfg.log.format == "text"


def test_toml_models_and_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
default_model = "chat"
[models.classifier]
path = "/m/a.gguf"
workers = 3
[models.chat]
path = "/m/b.gguf"
context = 4096
""",
    )
    cfg = load(Overrides(config=path), env={})
    assert cfg.default_model == "chat"
    assert cfg.model("classifier").workers == 3  # type: ignore[union-attr]
    assert cfg.model("chat").context == 4096  # type: ignore[union-attr]


def test_env_beats_toml_and_cli_beats_env(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nsocket = "/toml.sock"\n[log]\nformat = "text"\n')
    env = {"SIDECAR_SERVER_SOCKET": "/env.sock", "SIDECAR_LOG_FORMAT": "json"}
    assert load(Overrides(config=path), env=env).server.socket == Path("/env.sock")
    cfg = load(Overrides(config=path, socket=Path("/cli.sock")), env=env)
    assert cfg.server.socket == Path("/cli.sock")
    assert cfg.log.format == "json"


def test_config_file_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, '[log]\nlevel = "debug"\n')
    assert load(env={"SIDECAR_CONFIG": str(path)}).log.level == "debug"


def test_model_flag_with_path_defines_the_default_model(tmp_path: Path) -> None:
    cfg = load(Overrides(config=write(tmp_path, ""), model="/x/y.gguf", workers=1), env={})
    assert cfg.default_model == "default"
    assert cfg.models[0].path == Path("/x/y.gguf")
    assert cfg.models[0].workers == 1


def test_model_flag_with_a_name_selects_that_model(tmp_path: Path) -> None:
    path = write(tmp_path, '[models.a]\npath = "/a.gguf"\n[models.b]\npath = "/b.gguf"\n')
    assert load(Overrides(config=path, model="b"), env={}).default_model == "b"


def test_env_model_keys_apply_to_default_model(tmp_path: Path) -> None:
    cfg = load(
        Overrides(config=write(tmp_path, "")),
        env={"SIDECAR_MODEL_PATH": "/e.gguf", "SIDECAR_MODEL_THREADS": "2"},
    )
    assert cfg.models[0].path == Path("/e.gguf")
    assert cfg.models[0].threads == 2


@pytest.mark.parametrize(
    ("toml", "env", "key", "problem"),
    [
        ('[server]\ntcp_port = "eighty"', {}, "server.tcp_port", "expected int"),
        ("[server]\ntcp_port = 70000", {}, "server.tcp_port", "port"),
        (
            '[server]\ntcp_port = 8080\ntcp_host = "0.0.0.0"\ntcp_token = "t"',
            {},
            "server.tcp_host",
            "loopback",
        ),
        ("[server]\ntcp_port = 8080", {}, "server.tcp_token", "required"),
        ("[server]\nsockett = 1", {}, "server.sockett", "unknown key"),
        ('[log]\nformat = "xml"', {}, "log.format", "must be one of"),
        ('[models.a]\npath = "/a"\nworkers = 0', {}, "models.a.workers", ">= 1"),
        ("[models.a]\nworkers = 2", {}, "models.a.path", "required"),
        ('default_model = "zzz"\n[models.a]\npath = "/a"', {}, "default_model", "no [models.zzz]"),
        (
            "",
            {"SIDECAR_MODEL_PATH": "/a", "SIDECAR_MODEL_WORKERS": "many"},
            "models.default.workers",
            "expected int",
        ),
        (
            "",
            {"SIDECAR_SERVER_SOCKET_GROUP_ACCESS": "maybe"},
            "server.socket_group_access",
            "expected bool",
        ),
        ("surprise = 1", {}, "surprise", "unknown key"),
        ("[http]\nport = 8080", {}, "http.token", "required"),
        ('[http]\nport = 8080\ntoken = "t"\nhost = "10.0.0.1"', {}, "http.host", "loopback"),
        ("[http]\nprot = 1", {}, "http.prot", "unknown key"),
        ("", {"SIDECAR_HTTP_PORT": "web"}, "http.port", "expected int"),
        ("[models]\na = 1", {}, "models.a", "must be a table"),
    ],
)
def test_invalid_values_name_the_key(
    tmp_path: Path, toml: str, env: dict[str, str], key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as e:
        load(Overrides(config=write(tmp_path, toml)), env=env)
    assert e.value.key == key
    assert problem in e.value.problem


def test_http_api_is_off_by_default_and_set_by_toml_env_and_flags(tmp_path: Path) -> None:
    assert not load(Overrides(config=write(tmp_path, "")), env={}).http.enabled
    cfg = load(
        Overrides(config=write(tmp_path, '[http]\nsocket = "~/h.sock"')),
        env={"SIDECAR_HTTP_PORT": "8081", "SIDECAR_HTTP_TOKEN": "secret"},
    )
    assert cfg.http.enabled and cfg.http.port == 8081 and cfg.http.token == "secret"
    assert cfg.http.socket == str(Path("~/h.sock").expanduser())
    flags = load(
        Overrides(config=write(tmp_path, ""), http_port=9000, http_socket=Path("/x.sock")),
        env={"SIDECAR_HTTP_TOKEN": "t"},
    )
    assert (flags.http.port, flags.http.socket) == (9000, "/x.sock")


def test_broken_toml_is_reported_with_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(Overrides(config=path), env={})


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load(Overrides(config=tmp_path / "nope.toml"), env={})


def test_group_access_makes_socket_0660(tmp_path: Path) -> None:
    cfg = load(Overrides(config=write(tmp_path, "[server]\nsocket_group_access = true")), env={})
    assert cfg.server.socket_mode == 0o660


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load(Overrides(config=write(tmp_path, "")), env={})
    with pytest.raises(AttributeError):
        cfg.server.socket = Path("/elsewhere")  # type: ignore[misc]
