"""The Debian package under a real systemd: a minimal Debian booted with systemd-nspawn
(systemd as PID 1), the built .deb installed in it with apt, the demo model named in its
config, and the service driven with systemctl as an operator would.

Root only (debootstrap, nspawn); the rootfs is built once by scripts/nspawn-rootfs and
cached in ~/.cache/sidecar/rootfs; each run boots a throwaway copy, so nothing on this
machine changes. The tests run in file order against one container: start, status, reload,
hardening, socket access, watchdog, stop, purge. SIDECAR_TEST_NSPAWN=0 skips them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from deb_package import built_deb

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
MODEL = (
    Path(os.environ.get("SIDECAR_CACHE") or Path.home() / ".cache" / "sidecar")
    / "models"
    / "SmolLM2-135M-Instruct.Q4_1.gguf"
)
# What commands inside the container see: none of this machine's environment (PIP_*, ...).
CLEAN_ENV = ("PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive")
MODEL_CONFIG = """
[models.demo]
path = "/var/lib/sidecar/models/demo.gguf"
workers = 1
threads = 1
"""
SOCKET = "/run/sidecar/sidecar.sock"
# What `apt purge` may leave: logs, apt's and dpkg's own records, systemd's state.
# /var/backups is dpkg's daily copy of its database (dpkg-db-backup.timer), which the booted
# container may fire at any moment during the test.
PRUNED = (
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/tmp",
    "/mnt",
    "/var/log",
    "/var/lib/apt",
    "/var/cache/apt",
    "/var/lib/dpkg",
    "/var/backups",
    "/var/cache/debconf",
    "/var/lib/systemd",
)
SNAPSHOT = ("find", "/", "-xdev", "(", *" -o ".join(f"-path {p}" for p in PRUNED).split(), ")",
            "-prune", "-o", "-print")  # fmt: skip


def _why_not() -> str | None:
    """Why this machine cannot run these tests, or None when it can."""
    if os.environ.get("SIDECAR_TEST_NSPAWN") == "0":
        return "SIDECAR_TEST_NSPAWN=0"
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux (debootstrap, systemd-nspawn)"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter", "dpkg-deb"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} is not installed (SIDECAR_TEST_TOOLS=1 scripts/setup installs it)"
    if not MODEL.exists():
        return f"the demo model is not in the cache ({MODEL}); scripts/setup fetches it"
    probe = subprocess.run(["unshare", "--mount", "--pid", "--uts", "--ipc", "--net", "--fork",
                            "true"], capture_output=True, text=True, timeout=30)  # fmt: skip
    if probe.returncode != 0:
        return f"namespaces are not allowed here (unshare: {probe.stderr.strip()})"
    return None


_REASON = _why_not()
if _REASON is not None:
    pytestmark.append(pytest.mark.skip(reason=f"systemd boot tests: {_REASON}"))


@dataclass
class Container:
    """A booted container; commands enter its namespaces with nsenter."""

    nspawn: subprocess.Popen[bytes]
    init: int  # the container's PID 1 (systemd), as this machine numbers it
    log: Path

    def argv(self, *argv: str, user: str | None = None) -> list[str]:
        enter = ["nsenter", "-t", str(self.init), "-m", "-u", "-i", "-n", "-p"]
        as_user = ["runuser", "-u", user, "--"] if user else []
        return [*enter, "env", "-i", *CLEAN_ENV, *as_user, *argv]

    def run(
        self, *argv: str, user: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*argv, user=user), capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip

    def ok(self, *argv: str, user: str | None = None, timeout: float = 120) -> str:
        done = self.run(*argv, user=user, timeout=timeout)
        assert done.returncode == 0, (
            argv,
            done.returncode,
            done.stdout[-2000:],
            done.stderr[-3000:],
        )
        return done.stdout

    def show(self, *props: str) -> dict[str, str]:
        out = self.ok("systemctl", "show", "sidecar", *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def cursor(self) -> str:
        out = self.ok("journalctl", "-n0", "--show-cursor", "--no-pager")
        return out.rsplit("-- cursor: ", 1)[1].strip()

    def journal(self, after: str) -> str:
        """Every journal line since `after` (PID 1 logs at debug: notifications, states)."""
        return self.ok("journalctl", "--no-pager", "-o", "cat", f"--after-cursor={after}")


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_deb(tmp_path_factory)


@pytest.fixture(scope="module")
def rootfs() -> Path:
    pyver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    done = subprocess.run([str(REPO / "scripts" / "nspawn-rootfs"), pyver], capture_output=True,
                          text=True, timeout=1200)  # fmt: skip
    if done.returncode == 3:  # this machine cannot build it; the script says why
        pytest.skip(f"systemd boot tests: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1])


def _init_of(nspawn: subprocess.Popen[bytes], deadline: float) -> int:
    """The container's systemd: the nspawn process's child running systemd."""
    while time.monotonic() < deadline:
        assert nspawn.poll() is None, "systemd-nspawn exited while booting"
        try:
            children = Path(f"/proc/{nspawn.pid}/task/{nspawn.pid}/children").read_text().split()
            for pid in children:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
        except FileNotFoundError:
            pass
        time.sleep(0.1)
    raise AssertionError("no systemd inside the container after 60 s")


def _booted(box: Container, deadline: float) -> str:
    """Wait for the boot to finish; systemctl answers only once PID 1's socket is up."""
    state = ""
    while time.monotonic() < deadline:
        done = box.run("systemctl", "is-system-running", "--wait", timeout=180)
        state = done.stdout.strip() or done.stderr.strip()
        if state in ("running", "degraded", "maintenance", "stopping"):
            break
        time.sleep(0.5)
    return state


@pytest.fixture(scope="module")
def container(
    rootfs: Path, deb: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Container]:
    tmp = tmp_path_factory.mktemp("nspawn")
    root = tmp / "root"
    # A copy to boot and change: the cached tree stays pristine for the next run.
    subprocess.run(["cp", "-a", "--reflink=auto", str(rootfs), str(root)], check=True, timeout=600)
    log = tmp / "console.log"
    with log.open("wb") as console:
        nspawn = subprocess.Popen(
            [
                "systemd-nspawn", "--boot", "--quiet",
                # No machined or D-Bus on this side: stay in our own cgroup, register nowhere.
                "--register=no", "--keep-unit",
                "--console=read-only", "--private-network",
                f"--machine=sidecar-test-{os.getpid()}", f"--directory={root}",
                f"--bind-ro={deb.parent}:/mnt/deb", f"--bind-ro={MODEL.parent}:/mnt/models",
            ],
            stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    box: Container | None = None
    try:
        box = Container(nspawn, _init_of(nspawn, time.monotonic() + 60), log)
        state = _booted(box, time.monotonic() + 180)
        assert state in ("running", "degraded"), (state, log.read_text()[-3000:])
        # PID 1 at debug level logs every notification a service sends and each state change.
        box.ok("systemd-analyze", "log-level", "debug")
        yield box
    finally:
        _tear_down(nspawn, box)
        shutil.rmtree(tmp, ignore_errors=True)


def _tear_down(nspawn: subprocess.Popen[bytes], box: Container | None) -> None:
    """Always, even after a failure: SIGKILL to the container's PID 1 ends its whole PID
    namespace; then nspawn exits (its mounts live in its own namespace and go with it)."""
    if box is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(box.init, signal.SIGKILL)
    try:
        nspawn.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(nspawn.pid, signal.SIGKILL)
        nspawn.wait(timeout=30)


@dataclass
class Installed:
    box: Container
    before: set[str]  # the file tree before the package came


@pytest.fixture(scope="module")
def installed(container: Container, deb: Path) -> Installed:
    c = container
    for user in ("alice", "mallory"):
        c.ok("adduser", "--disabled-password", "--gecos", "", user)
    before = set(c.ok(*SNAPSHOT).splitlines())
    c.ok("apt-get", "install", "-y", "-qq", f"/mnt/deb/{deb.name}", timeout=600)
    c.ok("adduser", "alice", "sidecar")  # a caller: members of group sidecar may connect
    c.ok("install", "-o", "sidecar", "-g", "sidecar", "-m", "0640", f"/mnt/models/{MODEL.name}",
         "/var/lib/sidecar/models/demo.gguf")  # fmt: skip
    c.ok("sh", "-c", f"cat >> /etc/sidecar/config.toml <<'EOF'\n{MODEL_CONFIG}EOF")
    c.ok("systemctl", "enable", "sidecar")  # as the docs say; purge must undo it too
    return Installed(c, before)


def _start(c: Container) -> int:
    c.ok("systemctl", "start", "sidecar", timeout=180)
    return int(c.show("MainPID")["MainPID"])


def _journal_of_unit(c: Container) -> str:
    return c.run(
        "journalctl", "-u", "sidecar", "-p", "info", "--no-pager", "-o", "cat", "-n", "60"
    ).stdout


def test_start_returns_only_once_the_model_answers(installed: Installed) -> None:
    c = installed.box
    c.ok("systemctl", "stop", "sidecar")
    mark = c.cursor()
    began = time.monotonic()
    c.ok("systemctl", "start", "sidecar", timeout=180)
    took = time.monotonic() - began
    # No retry, no wait: the first request after `systemctl start` returns is answered.
    answer = c.run("sidecar", "generate", "--max-tokens", "4", "--temperature", "0", "Hello")
    assert answer.returncode == 0, (answer.stderr, _journal_of_unit(c))
    lines = c.journal(mark).splitlines()
    main = c.show("MainPID")["MainPID"]
    loaded = next(i for i, ln in enumerate(lines) if "model demo@" in ln and "ready" in ln)
    ready = next(i for i, ln in enumerate(lines) if f"from PID {main} (READY=1)" in ln)
    started = next(i for i, ln in enumerate(lines) if ln.startswith("Started sidecar.service"))
    assert loaded < ready < started
    print(f"systemctl start took {took:.1f} s")


def test_systemctl_status_shows_the_daemons_status_line(installed: Installed) -> None:
    c = installed.box
    _start(c)
    status = c.run("systemctl", "status", "sidecar", "--no-pager").stdout
    assert f'Status: "serving demo on {SOCKET}"' in status, status


def test_reload_goes_through_reloading_and_applies_live_keys(installed: Installed) -> None:
    c = installed.box
    main = _start(c)
    c.ok("sed", "-i", r"s/^\[server\]$/[server]\ngrace_seconds = 12/", "/etc/sidecar/config.toml")
    mark = c.cursor()
    c.ok("systemctl", "reload", "sidecar")
    lines = c.journal(mark).splitlines()
    reloading = next(
        (i for i, ln in enumerate(lines) if f"from PID {main} (RELOADING=1" in ln), None
    )
    assert reloading is not None, "\n".join(ln for ln in lines if "sidecar" in ln)
    ready = next(i for i, ln in enumerate(lines) if f"from PID {main} (READY=1)" in ln)
    assert reloading < ready
    assert any(ln == "sidecar.service: Changed reload -> running" for ln in lines[ready:])
    # The reload job ends only after READY=1, so the status is already the new one.
    assert c.show("MainPID", "NRestarts") == {"MainPID": str(main), "NRestarts": "0"}
    status = c.run("systemctl", "status", "sidecar", "--no-pager").stdout
    assert 'Status: "reloaded: applied: server.grace_seconds"' in status, status


def test_the_hardening_is_in_force_while_the_model_serves(installed: Installed) -> None:
    c = installed.box
    main = _start(c)
    workers = c.ok("pgrep", "-P", str(main)).split()
    assert workers
    for pid in (str(main), *workers):
        proc = dict(
            (k, v.strip())
            for k, v in (ln.split(":", 1) for ln in c.ok("cat", f"/proc/{pid}/status").splitlines())
        )
        uid = c.ok("id", "-u", "sidecar").strip()
        assert proc["Uid"].split() == [uid] * 4  # User=sidecar
        assert proc["NoNewPrivs"] == "1"
        assert proc["Seccomp"] == "2"  # SystemCallFilter=
        assert int(proc["CapEff"], 16) == int(proc["CapBnd"], 16) == 0  # CapabilityBoundingSet=
    inside = ["nsenter", "-t", str(main), "-m"]  # the service's own mount namespace
    etc = c.run(*inside, "touch", "/etc/sidecar/probe")
    assert "Read-only file system" in etc.stderr  # ProtectSystem=strict
    assert c.run(*inside, "ls", "/home/alice").returncode != 0  # ProtectHome=yes
    c.ok("touch", "/tmp/host-side")
    assert c.run(*inside, "ls", "/tmp/host-side").returncode != 0  # PrivateTmp=yes
    answer = c.run("sidecar", "generate", "--max-tokens", "4", "--temperature", "0", "Hi")
    assert answer.returncode == 0, answer.stderr
    exposure = c.run("systemd-analyze", "security", "sidecar", "--no-pager").stdout
    level = float(re.findall(r"Overall exposure level for sidecar.service: ([0-9.]+)", exposure)[0])
    assert level <= 2.0, exposure[-2000:]
    print(f"systemd-analyze security: exposure {level}")


def test_the_socket_admits_the_sidecar_group_and_no_other_user(installed: Installed) -> None:
    c = installed.box
    _start(c)
    member = c.run("sidecar", "generate", "--max-tokens", "2", "Hi", user="alice")
    assert member.returncode == 0, member.stderr
    other = c.run("sidecar", "generate", "--max-tokens", "2", "Hi", user="mallory")
    assert other.returncode == 3, (other.stdout, other.stderr)
    assert "permission denied" in other.stderr
    assert "add yourself to group `sidecar`" in other.stderr
    raw = c.run("/opt/sidecar/venv/bin/python", "-c",
                f"import socket; socket.socket(socket.AF_UNIX).connect({SOCKET!r})",
                user="mallory")  # fmt: skip
    assert "PermissionError" in raw.stderr


def test_the_watchdog_restarts_a_daemon_whose_loop_is_frozen(installed: Installed) -> None:
    c = installed.box
    main = _start(c)
    restarts = int(c.show("NRestarts")["NRestarts"])
    mark = c.cursor()
    c.ok("kill", "-STOP", str(main))  # the supervisor loop stops petting the watchdog
    frozen = time.monotonic()
    deadline = frozen + 120  # WatchdogSec=30, RestartSec=2, a model load
    while time.monotonic() < deadline:
        now = c.show("MainPID", "NRestarts", "ActiveState", "SubState")
        if now["MainPID"] not in ("0", str(main)) and now["SubState"] == "running":
            break
        time.sleep(1)
    else:
        raise AssertionError(f"not restarted within 120 s: {now}\n{_journal_of_unit(c)}")
    took = time.monotonic() - frozen
    assert int(now["NRestarts"]) == restarts + 1
    log = c.journal(mark)
    assert "sidecar.service: Watchdog timeout (limit 30s)!" in log
    assert "sidecar.service: Failed with result 'watchdog'." in log
    assert took >= 29, took  # the watchdog did it, not something sooner
    answer = c.run("sidecar", "generate", "--max-tokens", "4", "--temperature", "0", "Hi")
    assert answer.returncode == 0, answer.stderr
    print(f"frozen daemon replaced after {took:.0f} s")


def test_stop_drains_the_request_in_flight_and_exits_zero(installed: Installed) -> None:
    c = installed.box
    main = _start(c)
    prompt = "Count from 1 to 300, separated by commas: 1, 2, 3,"
    client = subprocess.Popen(
        c.argv("sidecar", "generate", "--stream", "--max-tokens", "120", "--temperature", "0",
               prompt),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert client.stdout is not None
    first = os.read(client.stdout.fileno(), 4096)  # the first tokens: the request is in flight
    assert first, client.stderr.read() if client.stderr else b""
    mark = c.cursor()
    c.ok("systemctl", "stop", "sidecar", timeout=60)
    rest, err = client.communicate(timeout=60)
    assert client.returncode == 0, err.decode()
    assert rest, err.decode()
    log = c.journal(mark)
    lines = log.splitlines()
    draining = next(i for i, ln in enumerate(lines) if '"msg": "draining (up to' in ln)
    served = next(i for i, ln in enumerate(lines) if "GenerateStream" in ln and "status=OK" in ln)
    exit_0 = "sidecar.service: Main process exited, code=exited, status=0/SUCCESS"
    exited = next(i for i, ln in enumerate(lines) if ln.startswith(exit_0))
    assert draining < served < exited  # the request finished after SIGTERM, before the exit
    assert f"sidecar.service: Got notification message from PID {main} (STOPPING=1)" in log
    assert "sidecar.service: Deactivated successfully." in log
    assert f"Killing process {main} (sidecar) with signal SIGKILL" not in log
    assert c.show("ActiveState")["ActiveState"] == "inactive"
    assert c.run("test", "-e", "/run/sidecar").returncode != 0  # RuntimeDirectory= is gone


def test_apt_purge_leaves_nothing(installed: Installed) -> None:
    c = installed.box
    _start(c)  # purge a running, enabled service
    c.ok("apt-get", "purge", "-y", "-qq", "sidecar", timeout=300)
    after = set(c.ok(*SNAPSHOT).splitlines())
    assert sorted(after - installed.before) == []  # nothing left behind
    assert sorted(installed.before - after) == []  # and nothing else taken
    for db in ("passwd", "group", "shadow", "gshadow"):
        assert c.run("getent", db, "sidecar").returncode == 2, db
    assert c.run("pgrep", "-f", "/opt/sidecar").returncode == 1  # nothing of it still runs
