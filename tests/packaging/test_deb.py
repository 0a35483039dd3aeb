"""The Debian package: built by packaging/deb/build, inspected with dpkg-deb and lintian,
its unit verified and its config skeleton loaded; installed and purged for real only where
that is safe (SIDECAR_TEST_DEB_INSTALL=1: a throwaway machine, as root, as CI is)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from deb_package import built_deb
from tiny_gguf import write_tiny_llama

from sidecar.config import Overrides, load

pytestmark = [
    pytest.mark.packaging,
    pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed"),
]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_deb(tmp_path_factory)


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    subprocess.run(["dpkg-deb", "-e", str(deb), str(root / "DEBIAN")], check=True)
    return root


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip


def test_control_fields(deb: Path) -> None:
    assert field(deb, "Package") == "sidecar"
    assert (
        field(deb, "Architecture")
        == subprocess.run(
            ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    depends = field(deb, "Depends")
    assert "python3." in depends and "-venv" in depends and "adduser" in depends
    info = subprocess.run(["dpkg-deb", "--info", str(deb)], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    for script in ("postinst", "prerm", "postrm", "conffiles", "md5sums"):
        assert script in info


def test_contents_paths_and_owners(deb: Path) -> None:
    listing = subprocess.run(["dpkg-deb", "--contents", str(deb)], capture_output=True,
                             text=True, check=True).stdout.splitlines()  # fmt: skip
    paths = {line.split()[5] for line in listing}
    for want in (
        "./etc/sidecar/config.toml",
        "./lib/systemd/system/sidecar.service",
        "./usr/bin/sidecar",
        "./usr/share/doc/sidecar/copyright",
        "./usr/share/sidecar/grafana/sidecar-dashboard.json",
        "./usr/share/sidecar/prometheus/sidecar-alerts.yml",
    ):
        assert want in paths, want
    wheels = [p for p in paths if p.startswith("./opt/sidecar/wheels/")]
    assert any("/sidecar-" in w for w in wheels) and any("llama_cpp_python" in w for w in wheels)
    assert all(line.split()[1] == "root/root" for line in listing)
    assert not [p for p in paths if p.endswith(".gguf")]


def test_maintainer_scripts_parse_and_conffile_is_the_config(unpacked: Path) -> None:
    for script in ("postinst", "prerm", "postrm"):
        path = unpacked / "DEBIAN" / script
        assert os.access(path, os.X_OK)
        subprocess.run(["sh", "-n", str(path)], check=True)
        assert "set -e" in path.read_text()
    assert (unpacked / "DEBIAN" / "conffiles").read_text().split() == ["/etc/sidecar/config.toml"]


def test_the_dashboard_and_alerting_rules_ship_as_in_the_repository(unpacked: Path) -> None:
    for shipped, source in (
        (
            "usr/share/sidecar/grafana/sidecar-dashboard.json",
            "packaging/grafana/sidecar-dashboard.json",
        ),
        (
            "usr/share/sidecar/prometheus/sidecar-alerts.yml",
            "packaging/prometheus/sidecar-alerts.yml",
        ),
    ):
        assert (unpacked / shipped).read_bytes() == (REPO / source).read_bytes(), shipped


def test_config_skeleton_loads(unpacked: Path) -> None:
    cfg = load(Overrides(config=unpacked / "etc" / "sidecar" / "config.toml"), env={})
    assert cfg.server.socket_group_access and cfg.log.format == "json"
    assert cfg.models == ()  # the operator names the model; the unit refuses to start until then
    # The socket is named here, not on the unit's command line: a plain `sidecar status`
    # falls back to this file and looks where the daemon listens.
    assert cfg.server.socket == Path("/run/sidecar/sidecar.sock")
    unit = (unpacked / "lib" / "systemd" / "system" / "sidecar.service").read_text()
    exec_start = next(ln for ln in unit.splitlines() if ln.startswith("ExecStart="))
    assert exec_start.split()[1:] == ["--config", "/etc/sidecar/config.toml", "serve"]


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
def test_the_packaged_unit_verifies(unpacked: Path, tmp_path: Path) -> None:
    unit = (unpacked / "lib" / "systemd" / "system" / "sidecar.service").read_text()
    # verify insists the binary exists: point it at one that does, as the unit tests do.
    unit = unit.replace("/opt/sidecar/venv/bin/sidecar", shutil.which("true") or "/bin/true")
    path = tmp_path / "sidecar.service"
    path.write_text(unit)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.skipif(shutil.which("lintian") is None, reason="lintian is not installed")
def test_lintian_finds_no_errors(deb: Path) -> None:
    done = subprocess.run(["lintian", "--fail-on", "error", str(deb)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    report = [line for line in done.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert done.returncode == 0, "\n".join(report)
    print("\n".join(report) or "lintian: clean")


@pytest.mark.skipif(
    os.environ.get("SIDECAR_TEST_DEB_INSTALL") != "1" or os.geteuid() != 0,
    reason="installs system-wide: set SIDECAR_TEST_DEB_INSTALL=1 on a throwaway machine (CI does)",
)
def test_install_serve_remove_and_purge(deb: Path, tmp_path: Path) -> None:
    def sh(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env)

    if Path("/opt/sidecar").exists() or sh("getent", "passwd", "sidecar").returncode == 0:
        pytest.skip("a sidecar package or user is already on this machine; not touching it")
    got = sh("apt-get", "install", "-y", "-qq", str(deb))
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-2000:]
    try:
        assert sh("getent", "passwd", "sidecar").returncode == 0
        assert Path("/var/lib/sidecar").is_dir()
        help_ = sh("/usr/bin/sidecar", "--help")
        assert help_.returncode == 0 and "serve" in help_.stdout
        model = write_tiny_llama(tmp_path / "tiny.gguf", n_ctx=1024)
        probe = sh("/opt/sidecar/venv/bin/python", "-c",
                   "from sidecar.update.delta import make_delta; import sidecar.cli; print('ok')")  # fmt: skip
        assert probe.stdout.strip() == "ok", probe.stderr
        (Path("/var/lib/sidecar/models") / "keep.gguf").write_bytes(model.read_bytes())
        removed = sh("apt-get", "remove", "-y", "-qq", "sidecar")
        assert removed.returncode == 0, removed.stderr
        assert not Path("/opt/sidecar/venv").exists()
        assert Path("/var/lib/sidecar/models/keep.gguf").exists()  # user data stays
        assert Path("/etc/sidecar/config.toml").exists()  # conffiles stay until purge
    finally:
        purged = sh("apt-get", "purge", "-y", "-qq", "sidecar")
    assert purged.returncode == 0, purged.stderr
    assert not Path("/var/lib/sidecar").exists() and not Path("/etc/sidecar").exists()
    assert sh("getent", "passwd", "sidecar").returncode != 0
