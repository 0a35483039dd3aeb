"""How clients find the daemon: the client view of the config, `--config` on either side of
the subcommand, `Client()` with no path, and the Debian package's unit + config."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from sidecar import config as cfgmod
from sidecar import service_units as svc
from sidecar.cli.commands import main
from sidecar.cli.support import EXIT_CONFIG, EXIT_NO_DAEMON
from sidecar.client import AsyncClient, Client
from sidecar.config import Overrides, load, load_client
from sidecar.domain.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
PACKAGED_CONFIG = REPO / "packaging" / "deb" / "config.toml"
SYSTEM_UNIT = REPO / "systemd" / "sidecar.service"

# A server's config as the docs recommend it: the secrets (http.token, the cloud key) live in
# the service's environment, so this file alone does not pass the server's checks.
FULL = """
default_model = "demo"
[server]
socket = "{socket}"
tcp_port = 7000
[http]
port = 8080
[cloud]
base_url = "https://api.example.com/v1"
model = "small"
api_key_env = "CLOUD_KEY"
[models.demo]
path = "/srv/models/demo.gguf"
[tasks.intents]
file = "intents.csv"
"""


@pytest.fixture
def no_default_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No user config and no system config: the defaults the machine has are not the test's."""
    home = tmp_path / "xdg"
    home.mkdir()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    monkeypatch.setattr(cfgmod, "SYSTEM_CONFIG", tmp_path / "etc-sidecar" / "config.toml")
    for var in ("SIDECAR_CONFIG", "SIDECAR_SERVER_SOCKET", "SIDECAR_SERVER_TCP_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return home


def full_config(tmp_path: Path, socket: Path) -> Path:
    path = tmp_path / "full.toml"
    path.write_text(FULL.format(socket=socket))
    return path


# ---------------------------------------------------------------- 1. the client view


def test_server_only_checks_fail_the_server_view_but_not_the_client_view(tmp_path: Path) -> None:
    path = full_config(tmp_path, tmp_path / "d.sock")
    with pytest.raises(ConfigError, match=r"http\.token"):
        load(Overrides(config=path), env={})
    view = load_client(Overrides(config=path), env={})
    assert view.socket == tmp_path / "d.sock"
    assert view.tcp_token == "" and view.source == path


def test_client_view_layers_flag_over_env_over_file(tmp_path: Path) -> None:
    path = full_config(tmp_path, Path("/toml.sock"))
    env = {"SIDECAR_SERVER_SOCKET": "/env.sock", "SIDECAR_SERVER_TCP_TOKEN": "t0k"}
    assert load_client(Overrides(config=path), env={}).socket == Path("/toml.sock")
    assert load_client(Overrides(config=path), env=env).socket == Path("/env.sock")
    assert load_client(Overrides(config=path), env=env).tcp_token == "t0k"
    flag = load_client(Overrides(config=path, socket=Path("/flag.sock")), env=env)
    assert flag.socket == Path("/flag.sock")
    env_file = load_client(env={"SIDECAR_CONFIG": str(path)})
    assert env_file.socket == Path("/toml.sock")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[server]\nsocket = 5\n", "server.socket"),
        ('[server]\ntcp_token = " x"\n', "server.tcp_token"),
        ('[server]\nsokcet = "/x.sock"\n', "server.sokcet"),
        ('server = "/x.sock"\n', "server"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_a_bad_client_key_still_errors_naming_it(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_client(Overrides(config=path), env={})
    assert key in str(e.value)


def test_client_command_with_a_full_server_config_looks_where_it_says(
    tmp_path: Path, no_default_configs: Path
) -> None:
    sock = tmp_path / "d.sock"
    path = full_config(tmp_path, sock)
    for args in (["--config", str(path), "status"], ["classify", "x", "-l", "a", "-l", "b",
                                                      "--config", str(path)]):  # fmt: skip
        out = CliRunner().invoke(main, args)
        assert out.exit_code == EXIT_NO_DAEMON, out.output
        assert f"no sidecar daemon is answering on unix:{sock}" in out.output


def test_client_command_with_a_bad_socket_key_exits_2_naming_it(
    tmp_path: Path, no_default_configs: Path
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nsocket = 5\n")
    out = CliRunner().invoke(main, ["--config", str(path), "status"])
    assert out.exit_code == EXIT_CONFIG, out.output
    assert "server.socket" in out.output


# ---------------------------------------------------------------- 2. --config on either side


def test_serve_accepts_config_after_the_subcommand(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text("[server]\nmax_message_bytes = 'lots'\n")
    out = CliRunner().invoke(main, ["serve", "--config", str(bad), "--model", "/x.gguf"])
    assert out.exit_code == EXIT_CONFIG, out.output
    assert "server.max_message_bytes" in out.output  # the file given after `serve` was read


def test_config_after_the_subcommand_wins_over_the_one_before(
    tmp_path: Path, no_default_configs: Path
) -> None:
    first, second = tmp_path / "a.toml", tmp_path / "b.toml"
    first.write_text(f'[server]\nsocket = "{tmp_path / "a.sock"}"\n')
    second.write_text(f'[server]\nsocket = "{tmp_path / "b.sock"}"\n')
    out = CliRunner().invoke(main, ["--config", str(first), "config", "--config", str(second)])
    assert out.exit_code == 0, out.output
    assert f"socket: {tmp_path / 'b.sock'}" in out.output
    out = CliRunner().invoke(main, ["--config", str(first), "status", "--config", str(second)])
    assert out.exit_code == EXIT_NO_DAEMON and "b.sock" in out.output, out.output


def test_config_after_a_nested_subcommand(tmp_path: Path, no_default_configs: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[server]\nsocket = "{tmp_path / "n.sock"}"\n')
    for args in (["models", "list", "--config", str(path)],
                 ["update", "check", "--config", str(path)]):  # fmt: skip
        out = CliRunner().invoke(main, args)
        assert out.exit_code == EXIT_NO_DAEMON, (args, out.output)
        assert "n.sock" in out.output


def test_help_documents_config_in_both_places() -> None:
    assert "--config" in CliRunner().invoke(main, ["--help"]).output
    for cmd in ("serve", "status", "config"):
        out = CliRunner().invoke(main, [cmd, "--help"]).output
        assert "--config" in out, cmd


# ---------------------------------------------------------------- 3. Client() finds the daemon


def test_client_without_a_path_uses_the_env_then_the_config_then_the_default(
    tmp_path: Path, no_default_configs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = cfgmod.default_socket_path()
    with Client() as c:
        assert c.target == f"unix:{default}"
    user_config = no_default_configs / "sidecar" / "config.toml"
    user_config.parent.mkdir()
    user_config.write_text('[server]\nsocket = "/from-user-config.sock"\n')
    with Client() as c:
        assert c.target == "unix:/from-user-config.sock"
    monkeypatch.setenv("SIDECAR_SERVER_SOCKET", "/from-env.sock")
    with Client() as c:
        assert c.target == "unix:/from-env.sock"
    with Client("/explicit.sock") as c:
        assert c.target == "unix:/explicit.sock"


async def test_async_client_finds_the_daemon_like_client(
    no_default_configs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIDECAR_SERVER_SOCKET", "/from-env.sock")
    c = AsyncClient()
    try:
        assert c.target == "unix:/from-env.sock"
    finally:
        await c.close()


def test_tcp_client_takes_the_token_from_the_config_unless_given(
    tmp_path: Path, no_default_configs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIDECAR_SERVER_TCP_TOKEN", "s3cret")
    with Client(tcp="127.0.0.1:7000") as c:
        assert ("authorization", "Bearer s3cret") in c._md
    with Client(tcp="127.0.0.1:7000", token="mine") as c:
        assert ("authorization", "Bearer mine") in c._md
    with Client() as c:  # a Unix socket caller needs no token; none is sent
        assert not any(k == "authorization" for k, _ in c._md)


def test_client_with_a_broken_config_names_the_key(
    tmp_path: Path, no_default_configs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nsocket = 5\n")
    monkeypatch.setenv("SIDECAR_CONFIG", str(path))
    with pytest.raises(ConfigError, match=r"server\.socket"):
        Client()
    with Client("/explicit.sock") as c:  # an explicit socket needs nothing from the file
        assert c.target == "unix:/explicit.sock"


# ---------------------------------------------------------------- 4. the system service


def test_client_falls_back_to_the_system_config_only_without_a_user_config(
    tmp_path: Path, no_default_configs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = tmp_path / "etc-sidecar" / "config.toml"
    system.parent.mkdir()
    system.write_text('[server]\nsocket = "/run/sidecar/sidecar.sock"\n')
    monkeypatch.setattr(cfgmod, "SYSTEM_CONFIG", system)
    assert load_client().socket == Path("/run/sidecar/sidecar.sock")
    assert load_client().source == system
    # The daemon a user starts by hand is theirs: the server view never reads the system file.
    assert load().source is None
    out = CliRunner().invoke(main, ["config"])
    assert out.exit_code == 0, out.output
    assert "source: (defaults and environment only)" in out.output
    assert f"clients look at: /run/sidecar/sidecar.sock ({system})" in out.output
    user_config = no_default_configs / "sidecar" / "config.toml"
    user_config.parent.mkdir()
    user_config.write_text('[server]\nsocket = "/mine.sock"\n')
    assert load_client().socket == Path("/mine.sock")


def unit_exec_start(text: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    return shlex.split(line.partition("=")[2])


def runtime_directory(text: str) -> Path:
    line = next(ln for ln in text.splitlines() if ln.startswith("RuntimeDirectory="))
    return Path("/run") / line.partition("=")[2].strip()


def test_packaged_unit_and_config_lead_a_plain_client_to_the_daemon(
    tmp_path: Path, no_default_configs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unit = SYSTEM_UNIT.read_text()
    argv = unit_exec_start(unit)
    # The unit names only the config; the socket is in the config, the one place both read.
    assert argv[1:] == ["--config", str(svc.SYSTEM_CONFIG), "serve"]
    assert str(svc.SYSTEM_CONFIG) == "/etc/sidecar/config.toml"  # where clients fall back
    build = (REPO / "packaging" / "deb" / "build").read_text()
    assert 'install -m 0644 packaging/deb/config.toml "$PKG/etc/sidecar/config.toml"' in build
    assert 'systemd/sidecar.service "$PKG/lib/systemd/system/sidecar.service"' in build

    # What the daemon does with that command line and the packaged config...
    served = load(Overrides(config=PACKAGED_CONFIG), env={}).server.socket
    assert served.parent == runtime_directory(unit)  # a directory the unit makes for it
    # ...and where a plain `sidecar status` and `Client()` look on that machine.
    monkeypatch.setattr(cfgmod, "SYSTEM_CONFIG", PACKAGED_CONFIG)
    assert load_client().socket == served
    with Client() as c:
        assert c.target == f"unix:{served}"
    out = CliRunner().invoke(main, ["status"])
    assert out.exit_code == EXIT_NO_DAEMON, out.output
    assert f"no sidecar daemon is answering on unix:{served}" in out.output


def test_service_install_without_socket_leaves_it_to_the_config(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    # No config yet (named: the real /etc/sidecar/config.toml may exist on this machine).
    none = tmp_path / "missing.toml"
    plan = svc.plan_install(False, root=tmp_path / "root", env=env, platform="linux", config=none)
    assert "--socket" not in unit_exec_start(plan.text)
    assert any("server.socket" in n for n in plan.notes), plan.notes
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nsocket = "/run/sidecar/sidecar.sock"\n')
    plan = svc.plan_install(False, root=tmp_path / "root", env=env, platform="linux", config=cfg)
    assert not plan.notes, plan.notes
    cfg.write_text("[log]\nlevel = 'info'\n")  # the daemon would fall back to a private /tmp
    plan = svc.plan_install(False, root=tmp_path / "root", env=env, platform="linux", config=cfg)
    assert any("server.socket" in n and "/run/sidecar" in n for n in plan.notes), plan.notes
    given = svc.plan_install(False, root=tmp_path / "root", env=env, platform="linux",
                             config=cfg, socket=Path("/run/sidecar/other.sock"))  # fmt: skip
    assert unit_exec_start(given.text)[-2:] == ["--socket", "/run/sidecar/other.sock"]
