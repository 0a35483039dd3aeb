"""The shipped systemd units and launchd plist, and `sidecar service install|uninstall|status`.

systemd-analyze verify checks the units as shipped with only the binary path swapped for
one that exists (verify insists on it), and the units `service install` renders.
"""

from __future__ import annotations

import os
import plistlib
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sidecar import service_units as svc
from sidecar.cli.commands import main
from sidecar.cli.service import service
from sidecar.domain.errors import FailedPrecondition

REPO = Path(__file__).resolve().parents[2]
SYSTEM_UNIT = REPO / "systemd" / "sidecar.service"
USER_UNIT = REPO / "systemd" / "sidecar-user.service"
PLIST = REPO / "packaging" / "dev.sidecar.daemon.plist"
SIDECAR = Path(sys.executable).absolute().parent / "sidecar"  # what install puts in ExecStart
SHIPPED_BINARY = {SYSTEM_UNIT: "/opt/sidecar/venv/bin/sidecar", USER_UNIT: "%h/.local/bin/sidecar"}

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (scripts/setup installs it: apt-get install systemd)",
)


@pytest.fixture(autouse=True)
def _checkout_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where this checkout lives (a clone under /tmp, a home directory) is no business of
    these tests: the sandbox check ignores the running venv's own `sidecar`. The tests of
    that check name their paths explicitly."""
    real = svc._hidden
    monkeypatch.setattr(svc, "_hidden", lambda paths: real([p for p in paths if p != SIDECAR]))


def directives(text: str) -> dict[str, list[str]]:
    """'Section.Key' -> values, as systemd reads them (comments and blank lines skipped)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def one(d: dict[str, list[str]], key: str) -> str:
    values = d.get(f"Service.{key}", [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def verify(unit_text: str, tmp_path: Path, *, user: bool) -> None:
    """systemd-analyze verify; any complaint (unknown key, bad value) fails, not just errors."""
    unit = tmp_path / "verify" / "sidecar.service"
    unit.parent.mkdir()
    unit.write_text(unit_text)
    runtime = tmp_path / "runtime"  # %t in a user unit needs XDG_RUNTIME_DIR
    runtime.mkdir(mode=0o700)
    argv = ["systemd-analyze", *(["--user"] if user else []), "verify", "--man=no", str(unit)]
    env = {"PATH": os.environ.get("PATH", ""), "XDG_RUNTIME_DIR": str(runtime)}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30, check=False)
    assert (done.returncode, done.stderr + done.stdout) == (0, ""), unit_text


def shipped_with_real_binary(path: Path) -> str:
    text = path.read_text()
    assert text.count(SHIPPED_BINARY[path]) == 1
    return text.replace(SHIPPED_BINARY[path], str(SIDECAR))


# ---------------------------------------------------------------- the shipped files


def test_shipped_files_are_what_service_install_renders() -> None:
    for rel, text in svc.shipped_files().items():
        assert (REPO / rel).read_text() == text, (
            f"{rel} is stale: regenerate with .venv/bin/python -c 'from pathlib import Path; "
            "from sidecar.service_units import shipped_files; "
            "[Path(p).write_text(t) for p, t in shipped_files().items()]'"
        )


@needs_analyze
@pytest.mark.parametrize("path", [SYSTEM_UNIT, USER_UNIT], ids=["system", "user"])
def test_shipped_unit_passes_systemd_analyze_verify(path: Path, tmp_path: Path) -> None:
    verify(shipped_with_real_binary(path), tmp_path, user=path == USER_UNIT)


@needs_analyze
def test_verify_catches_what_systemd_would_ignore(tmp_path: Path) -> None:
    # Proves the check above has teeth: systemd skips an unknown key with only a warning.
    broken = shipped_with_real_binary(SYSTEM_UNIT).replace("Type=notify", "Type=notify\nWatchDog=1")
    with pytest.raises(AssertionError, match="Unknown key"):
        verify(broken, tmp_path, user=False)


@pytest.mark.parametrize("path", [SYSTEM_UNIT, USER_UNIT], ids=["system", "user"])
def test_units_declare_the_service_contract(path: Path) -> None:
    d = directives(path.read_text())
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "2",
        "TimeoutStopSec": "30",
        "KillSignal": "SIGTERM",
        "KillMode": "mixed",
        "RuntimeDirectory": "sidecar",
        "StateDirectory": "sidecar",
        "NoNewPrivileges": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "LockPersonality": "yes",
        "RestrictRealtime": "yes",
        "SystemCallArchitectures": "native",
    }
    assert {k: one(d, k) for k in expected} == expected
    assert "# MemoryMax=2G" in path.read_text().splitlines()


def test_system_unit_is_hardened() -> None:
    d = directives(SYSTEM_UNIT.read_text())
    expected = {
        "User": "sidecar",
        "Group": "sidecar",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "CapabilityBoundingSet": "",
    }
    assert {k: one(d, k) for k in expected} == expected
    argv = shlex.split(one(d, "ExecStart"))
    # No --socket: server.socket in the config names it, where `sidecar status` looks too.
    assert argv[1:] == ["--config", "/etc/sidecar/config.toml", "serve"]
    assert d["Install.WantedBy"] == ["multi-user.target"]


def test_user_unit_uses_only_what_a_user_manager_can_apply() -> None:
    d = directives(USER_UNIT.read_text())
    assert shlex.split(one(d, "ExecStart"))[0] == "%h/.local/bin/sidecar"
    # No --socket: the user's config or the default, %t/sidecar/sidecar.sock, as for clients.
    assert "--socket" not in one(d, "ExecStart")
    assert one(d, "RuntimeDirectory") == "sidecar"
    # These need a mount namespace (or hide the home directory the venv lives in).
    for key in ("User", "ProtectSystem", "ProtectHome", "PrivateTmp", "ProtectKernelTunables"):
        assert f"Service.{key}" not in d, key
    assert d["Install.WantedBy"] == ["default.target"]


@pytest.mark.parametrize("path", [SYSTEM_UNIT, USER_UNIT], ids=["system", "user"])
def test_exec_start_is_a_command_line_the_cli_accepts(path: Path) -> None:
    args = shlex.split(one(directives(path.read_text()), "ExecStart"))[1:]
    out = CliRunner().invoke(main, [*args, "--help"])
    assert out.exit_code == 0, out.output
    assert "Run the daemon in the foreground" in out.output


def test_plist_is_a_keepalive_launch_agent() -> None:
    with PLIST.open("rb") as f:
        p = plistlib.load(f)
    assert p["Label"] == "dev.sidecar.daemon"
    assert p["ProgramArguments"] == [
        "@SIDECAR@",
        "--config",
        "@CONFIG@",
        "serve",
    ]
    assert p["RunAtLoad"] is True
    assert p["KeepAlive"] == {"SuccessfulExit": False}  # restart after a crash
    assert p["ProcessType"] == "Background"
    assert p["StandardOutPath"] == p["StandardErrorPath"] == "@LOG@"
    out = CliRunner().invoke(main, [*p["ProgramArguments"][1:], "--help"])
    assert out.exit_code == 0, out.output


# ---------------------------------------------------------------- install / uninstall / status


def run(*args: str, home: Path, **kw: object) -> tuple[int, str]:
    env = {"HOME": str(home), "XDG_CONFIG_HOME": None, "XDG_RUNTIME_DIR": None}
    out = CliRunner().invoke(service, list(args), env=env, **kw)  # type: ignore[arg-type]
    return out.exit_code, out.output


def test_install_writes_the_system_unit_with_this_installations_paths(tmp_path: Path) -> None:
    code, output = run("install", "--root", str(tmp_path), home=tmp_path / "home")
    assert code == 0, output
    unit = tmp_path / "etc/systemd/system/sidecar.service"
    assert f"wrote systemd system unit {unit}" in output
    assert "systemctl daemon-reload && systemctl enable --now sidecar" in output
    assert "useradd --system" in output
    assert "/etc/sidecar/config.toml does not exist yet" in output
    exec_start = shlex.split(one(directives(unit.read_text()), "ExecStart"))
    assert exec_start == [str(SIDECAR), "--config", "/etc/sidecar/config.toml", "serve"]
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    # Everything but the binary is the shipped unit.
    assert unit.read_text() == shipped_with_real_binary(SYSTEM_UNIT)


def test_install_user_unit_into_the_users_config_dir(tmp_path: Path) -> None:
    home = tmp_path / "home"
    config = home / "cfg.toml"
    config.parent.mkdir()
    config.touch()
    code, output = run(
        "install", "--user", "--root", str(tmp_path), home=home, obj={"config": config}
    )
    assert code == 0, output
    unit = tmp_path / home.relative_to("/") / ".config/systemd/user/sidecar.service"
    assert unit.is_file()
    assert "systemctl --user daemon-reload && systemctl --user enable --now sidecar" in output
    assert "does not exist" not in output
    exec_start = shlex.split(one(directives(unit.read_text()), "ExecStart"))
    assert exec_start == [str(SIDECAR), "--config", str(config), "serve"]


@needs_analyze
@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_installed_units_pass_verify(tmp_path: Path, user: bool) -> None:
    env = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": "/run/user/1000"}
    plan = svc.plan_install(user, root=tmp_path / "root", env=env, platform="linux")
    verify(plan.text, tmp_path, user=user)


@needs_analyze
def test_paths_with_spaces_and_percent_signs_survive_into_exec_start(tmp_path: Path) -> None:
    venv = tmp_path / "my venv %h ${X}" / "bin"
    venv.mkdir(parents=True)
    script = venv / "sidecar"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    plan = svc.plan_install(
        False, root=tmp_path, env={}, platform="linux", executable=str(venv / "python")
    )
    # verify resolves the ExecStart binary: it finds it only if quoting and escaping are right.
    verify(plan.text, tmp_path, user=False)
    # Arguments get variable expansion too, which the command path does not.
    assert svc.systemd_arg("/etc/a b/${X}%i.toml") == '"/etc/a b/$${X}%%i.toml"'


def test_dry_run_prints_the_unit_and_writes_nothing(tmp_path: Path) -> None:
    out = CliRunner().invoke(service, ["install", "--dry-run", "--root", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert out.stdout.startswith("# sidecar, the local inference daemon")
    assert "Type=notify" in out.stdout and "next:" not in out.stdout
    assert "would write" in out.stderr
    assert not any(tmp_path.iterdir())


def test_uninstall_removes_the_unit_and_its_enablement_link(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run("install", "--root", str(tmp_path), home=home)[0] == 0
    unit = tmp_path / "etc/systemd/system/sidecar.service"
    wants = unit.parent / "multi-user.target.wants" / "sidecar.service"
    wants.parent.mkdir()
    wants.symlink_to(unit)  # what `systemctl enable` leaves
    code, output = run("uninstall", "--root", str(tmp_path), home=home)
    assert code == 0, output
    assert not unit.exists() and not wants.is_symlink()
    assert f"removed {unit}" in output and "systemctl stop sidecar" in output
    code, output = run("uninstall", "--root", str(tmp_path), home=home)
    assert (code, "nothing to remove" in output) == (0, True)


def test_status_reports_the_file_and_never_needs_systemd(tmp_path: Path) -> None:
    home = tmp_path / "home"
    unit = tmp_path / "etc/systemd/system/sidecar.service"
    code, output = run("status", "--root", str(tmp_path), home=home)
    assert (code, f"{unit} (not installed)" in output) == (3, True), output
    assert run("install", "--root", str(tmp_path), home=home)[0] == 0
    code, output = run("status", "--root", str(tmp_path), home=home)
    assert (code, f"{unit} (installed)" in output) == (0, True), output
    assert "systemctl: " in output  # whatever systemctl said, or that it is absent
    empty_path = {"HOME": str(home), "PATH": str(tmp_path)}
    out = CliRunner().invoke(service, ["status", "--root", str(tmp_path)], env=empty_path)
    assert out.exit_code == 0 and "systemctl: not available here" in out.output


def test_status_exits_3_saying_how_to_install_when_nothing_is_installed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    code, output = run("status", "--root", str(tmp_path), home=home)
    assert code == 3, output
    assert "not installed: `sudo sidecar service install` writes it" in output
    code, output = run("status", "--user", "--root", str(tmp_path), home=home)
    assert code == 3 and "`sidecar service install --user` writes it" in output, output
    # The other scope is installed: say so instead of leaving the user guessing.
    assert run("install", "--user", "--root", str(tmp_path), home=home)[0] == 0
    code, output = run("status", "--root", str(tmp_path), home=home)
    assert code == 3 and "a per-user unit is installed" in output, output
    assert "sidecar service status --user" in output
    assert run("status", "--user", "--root", str(tmp_path), home=home)[0] == 0


def test_dry_run_warns_that_private_tmp_hides_paths_under_tmp(tmp_path: Path) -> None:
    code, output = run(
        "install", "--dry-run", "--root", str(tmp_path), "--config", "/tmp/c.toml",
        "--socket", "/var/tmp/s.sock", home=tmp_path,
    )  # fmt: skip
    assert code == 0, output
    assert "warning: /tmp/c.toml is under /tmp, which PrivateTmp=yes" in output
    assert "warning: /var/tmp/s.sock is under /var/tmp, which PrivateTmp=yes" in output
    assert not any(tmp_path.iterdir())
    # The binary itself: a venv under /tmp cannot be started at all.
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "sidecar").write_text("#!/bin/sh\n")
    (venv / "sidecar").chmod(0o755)
    plan = svc.plan_install(
        False, root=tmp_path / "root", env={}, platform="linux", executable=str(venv / "python")
    )
    assert [h.split(" is ")[0] for h in plan.hidden] == [str(venv / "sidecar")]
    user = svc.plan_install(True, root=tmp_path, env={}, platform="linux",
                            executable=str(venv / "python"))  # fmt: skip
    assert user.hidden == ()  # the user unit has no PrivateTmp


def test_install_refuses_a_unit_whose_paths_the_sandbox_hides(tmp_path: Path) -> None:
    code, output = run(
        "install", "--root", str(tmp_path), "--config", "/tmp/c.toml", home=tmp_path / "home"
    )
    assert code == 1, output
    assert "error: /tmp/c.toml is under /tmp, which PrivateTmp=yes" in output
    assert "nothing written" in output and "--dry-run" in output
    assert not (tmp_path / "etc/systemd/system/sidecar.service").exists()


def test_probe_reports_what_the_manager_says() -> None:
    assert svc.run_probe(["sh", "-c", "echo inactive; exit 3"]) == "inactive"
    assert svc.run_probe(["sh", "-c", "echo no bus >&2; exit 1"]) == "unknown (no bus)"
    assert svc.run_probe(["no-such-systemctl-here"]) is None


def test_launchd_install_renders_a_plist_with_real_paths(tmp_path: Path) -> None:
    home = Path("/Users/ada")
    plan = svc.plan_install(True, root=tmp_path, env={}, platform="darwin", home=home)
    svc.install(plan)
    assert plan.path == tmp_path / "Users/ada/Library/LaunchAgents/dev.sidecar.daemon.plist"
    with plan.path.open("rb") as f:
        p = plistlib.load(f)
    assert p["ProgramArguments"][0] == str(SIDECAR)
    assert p["ProgramArguments"][1:4:2] == ["--config", "serve"]
    assert p["StandardErrorPath"] == "/Users/ada/Library/Logs/sidecar/sidecar.log"
    assert (tmp_path / "Users/ada/Library/Logs/sidecar").is_dir()  # launchd will not make it
    assert any(s.startswith("launchctl bootout") and "launchctl bootstrap gui/$(id -u) " in s
               for s in plan.next_steps)  # fmt: skip


def test_write_failure_exits_1_and_usage_exits_2(tmp_path: Path) -> None:
    (tmp_path / "etc").write_text("not a directory")
    code, output = run("install", "--root", str(tmp_path), home=tmp_path)
    assert code == 1 and "error: cannot write" in output
    assert run("install", "--no-such-flag", home=tmp_path)[0] == 2


def test_unsupported_platform_is_a_clear_failure() -> None:
    with pytest.raises(FailedPrecondition, match="win32"):
        svc.kind_for(False, "win32")
