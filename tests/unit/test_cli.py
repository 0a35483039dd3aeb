from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from sidecar.cli.commands import main
from sidecar.cli.support import EXIT_CONFIG, EXIT_NO_DAEMON


def test_config_keys_lists_every_key() -> None:
    out = CliRunner().invoke(main, ["config", "--keys"])
    assert out.exit_code == 0
    assert "server.socket " in out.output and "models.NAME.workers" in out.output


def test_invalid_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text("[server]\nmax_message_bytes = 'lots'\n")
    out = CliRunner().invoke(main, ["--config", str(bad), "serve", "--model", "/x.gguf"])
    assert out.exit_code == EXIT_CONFIG
    assert "server.max_message_bytes" in out.output


def test_invalid_env_value_exits_2(tmp_path: Path) -> None:
    empty = tmp_path / "c.toml"
    empty.touch()
    out = CliRunner().invoke(
        main,
        ["--config", str(empty), "serve", "--model", "/x.gguf"],
        env={"SIDECAR_MODEL_WORKERS": "0"},
    )
    assert out.exit_code == EXIT_CONFIG
    assert "models.default.workers" in out.output


def test_serve_without_a_model_exits_2(tmp_path: Path) -> None:
    empty = tmp_path / "c.toml"
    empty.touch()
    out = CliRunner().invoke(main, ["--config", str(empty), "serve"])
    assert out.exit_code == EXIT_CONFIG
    assert "no model configured" in out.output


def test_serve_with_a_missing_model_file_fails_clearly(tmp_path: Path) -> None:
    empty = tmp_path / "c.toml"
    empty.touch()
    sock = Path("/tmp") / f"sc-cli-{id(tmp_path)}.sock"
    args = [
        "--config",
        str(empty),
        "serve",
        "--socket",
        str(sock),
        "--store",
        str(tmp_path / "store"),
    ]
    out = CliRunner().invoke(main, [*args, "--model", str(tmp_path / "gone.gguf")])
    assert out.exit_code == 1
    assert "gone.gguf" in out.output
    assert not sock.exists()


def test_client_command_without_daemon_exits_3(tmp_path: Path) -> None:
    empty = tmp_path / "c.toml"
    empty.touch()
    for args in (["status"], ["classify", "x", "-l", "a", "-l", "b"], ["generate", "hi"]):
        out = CliRunner().invoke(
            main, ["--config", str(empty), *args, "--socket", str(tmp_path / "none.sock")]
        )
        assert out.exit_code == EXIT_NO_DAEMON, out.output
        assert "no sidecar daemon is answering" in out.output


def test_ctrl_c_in_any_command_exits_130_not_aborted(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import sidecar.cli.commands as cli

    def interrupted(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "connect", interrupted)
    out = CliRunner().invoke(main, ["status", "--socket", str(tmp_path / "s.sock")])
    assert out.exit_code == 130 and "Aborted" not in out.output


def test_a_socket_the_user_may_not_reach_is_a_clear_error(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    def denied(self: Path, *a: object, **k: object) -> bool:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "exists", denied)
    out = CliRunner().invoke(main, ["status", "--socket", str(tmp_path / "d" / "s.sock")])
    assert out.exit_code == EXIT_NO_DAEMON, out.output
    assert "permission denied" in out.output and "group" in out.output
