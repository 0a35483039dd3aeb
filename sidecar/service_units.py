"""`sidecar service install | uninstall | status`: run the daemon under systemd or launchd.

The unit files and the plist are rendered here, so an installed wheel needs no data files.
`systemd/sidecar.service`, `systemd/sidecar-user.service` and
`packaging/dev.sidecar.daemon.plist` in the repository are these templates rendered with
their shipped defaults (`shipped_files()`); a test keeps them identical.

Every path this module writes is under `root` (default "/"), so tests install into a
temporary directory; nothing here calls systemctl or launchctl except `status`, which
only reads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from xml.sax.saxutils import escape

from sidecar.config import SYSTEM_CONFIG, Overrides, default_config_path, load_client
from sidecar.domain.errors import ConfigError, FailedPrecondition

Kind = Literal["system", "user", "launchd"]
LABEL = "dev.sidecar.daemon"
UNIT = "sidecar.service"
# Where the system daemon's socket goes: the unit's RuntimeDirectory. The unit passes no
# --socket: server.socket in SYSTEM_CONFIG names it, the one place the daemon and a plain
# `sidecar status` both read (the Debian package's config sets it).
SYSTEM_SOCKET = Path("/run/sidecar/sidecar.sock")
# A systemd or launchctl that hangs (no bus, no session) must not hang `sidecar service status`.
PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Paths:
    """What goes into the file, already in the file's syntax (systemd specifiers allowed)."""

    sidecar: str
    config: str
    socket: str  # "" = no --socket: the daemon and its clients take it from the config
    log: str = ""  # launchd only: systemd sends output to the journal


@dataclass(frozen=True)
class Plan:
    kind: Kind
    path: Path  # where the file goes
    text: str
    next_steps: tuple[str, ...]
    notes: tuple[str, ...]
    make_dirs: tuple[Path, ...] = ()  # beside the file, e.g. the launchd log directory
    # Paths the unit's sandbox hides from the service, so it could never start: `install`
    # refuses to write such a unit, `--dry-run` prints it with these as warnings.
    hidden: tuple[str, ...] = ()


@dataclass(frozen=True)
class Status:
    kind: Kind
    path: Path
    installed: bool
    state: str | None  # the service manager's answer; None when it has no command here
    elsewhere: Path | None = None  # the other scope's unit (system/user), when that one exists


# ---------------------------------------------------------------- templates

_SYSTEMD_HEAD = """\
# sidecar, the local inference daemon, as a {scope} service.
# `sidecar service install{flag}` writes this file with the real paths filled in.
[Unit]
Description=sidecar local inference daemon ({scope})

[Service]
# READY=1 comes only once every model is loaded and answering, so units ordered
# After=sidecar.service start against a socket that works.
Type=notify
# The llama.cpp workers inherit NOTIFY_SOCKET; only the daemon may speak for the service.
NotifyAccess=main
ExecStart={exec_start}
# SIGHUP re-reads the config and applies what can change live (RELOADING=1 ... READY=1).
ExecReload=/bin/kill -HUP $MAINPID
# The supervisor loop pets the watchdog every server.ping_interval_seconds (2 s); a wedged
# event loop stops the pings and systemd restarts the daemon.
WatchdogSec=30
Restart=on-failure
RestartSec=2
# Exit code 2 is a configuration error: restarting cannot fix it, only flood the journal.
RestartPreventExitStatus=2
# Loading a bigger model takes a while before READY=1.
TimeoutStartSec=120
# SIGTERM drains in-flight requests (server.grace_seconds, 10 s by default), then stops the
# workers; 30 s leaves room for both before SIGKILL.
KillSignal=SIGTERM
TimeoutStopSec=30
# Only the daemon gets SIGTERM: it stops its workers after the drain. Signalling the
# whole cgroup at once would kill the requests the drain is waiting for.
KillMode=mixed
# An encrypted model store (store.encryption = true, docs/encryption.md) takes its key
# best as a credential: encrypted at rest by systemd (host key or TPM), decrypted only into
# this service's private $CREDENTIALS_DIRECTORY. Make it with
#   sidecar models keygen -o key
#   systemd-creds encrypt --name=sidecar-store-key key /etc/credstore.encrypted/sidecar-store-key
#   shred -u key
# LoadCredentialEncrypted=sidecar-store-key:/etc/credstore.encrypted/sidecar-store-key
"""

_SYSTEM_BODY = """\
User=sidecar
Group=sidecar
# /run/sidecar holds the socket (server.socket in the config, where `sidecar status` looks
# too) and its lock file. 0750 lets members of group sidecar reach the socket when
# server.socket_group_access = true (the socket is 0600 otherwise).
RuntimeDirectory=sidecar
RuntimeDirectoryMode=0750
# /var/lib/sidecar and /var/cache/sidecar stay writable under ProtectSystem=strict.
# Pointing the XDG dirs there puts the default model store in /var/lib/sidecar/store
# instead of a home directory that ProtectHome hides.
StateDirectory=sidecar
CacheDirectory=sidecar
Environment=XDG_DATA_HOME=%S XDG_CACHE_HOME=%C

# The daemon reads its config and models, writes only the directories above, and talks
# over Unix sockets and loopback TCP; everything else is closed.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
# CPU inference needs no devices; a GPU build of llama.cpp needs this off.
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
# The TCP and metrics listeners accept loopback addresses only; this has the kernel agree.
IPAddressAllow=localhost
IPAddressDeny=any
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
# A call outside the filter fails with an error the daemon logs, rather than killing it.
SystemCallErrorNumber=EPERM
CapabilityBoundingSet=
UMask=0077
RemoveIPC=yes
# Not ProcSubset=pid: memory-pressure shedding reads /proc/meminfo.
ProtectProc=invisible
# Not MemoryDenyWriteExecute=yes: ctypes callbacks (llama-cpp-python's log hook) need
# libffi trampolines that are writable and executable.
# A watched drop folder (store.drop) or metrics socket outside the directories above
# must be listed here, or the daemon cannot write there:
# ReadWritePaths=/srv/sidecar/drop

# The daemon and its workers share one cgroup, so this caps them together: past it the
# kernel OOM-kills inside sidecar instead of another process on the machine. Size it as
# the model files (mapped once, shared by the workers) + the KV cache per worker + about
# 200 MB; too low and the workers die in a restart loop.
# MemoryMax=2G

[Install]
WantedBy=multi-user.target
"""

_USER_BODY = """\
# $XDG_RUNTIME_DIR/sidecar holds the socket, where clients look by default.
RuntimeDirectory=sidecar
RuntimeDirectoryMode=0700
StateDirectory=sidecar

# Only restrictions that need no privileges (prctl and seccomp), which a user manager
# applies as is.
NoNewPrivileges=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
UMask=0077
# Not MemoryDenyWriteExecute=yes: ctypes callbacks need writable+executable trampolines.
# Mount-namespace options make a user manager create a user namespace first; where
# unprivileged user namespaces are restricted (hardened kernels, AppArmor policies such as
# Ubuntu 24.04's) the service can fail to start at all. Uncomment them where they work.
# ProtectHome= stays off either way: the venv, config and models live in the home directory.
# PrivateTmp=yes
# ProtectKernelTunables=yes
# ProtectControlGroups=yes

# Caps the daemon and its workers together; see the system unit for how to size it.
# MemoryMax=2G

[Install]
WantedBy=default.target
"""

_PLIST = """\
<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" \
"http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<!-- sidecar, the local inference daemon, as a per-user launchd agent.
     `sidecar service install` writes this to ~/Library/LaunchAgents with real paths. -->
<plist version="1.0">
<dict>
  <key>Label</key>
  <string>{label}</string>
  <key>ProgramArguments</key>
  <array>
{arguments}
  </array>
  <key>RunAtLoad</key>
  <true/>
  <!-- Restart after a crash, not after a deliberate stop: SIGTERM drains and exits 0. -->
  <key>KeepAlive</key>
  <dict>
    <key>SuccessfulExit</key>
    <false/>
  </dict>
  <!-- Background keeps inference from competing with the apps the user is working in;
       launchd throttles its CPU and I/O, so tokens are slower on a busy machine (and on
       Apple silicon may stay on efficiency cores). Use Standard where latency matters more. -->
  <key>ProcessType</key>
  <string>Background</string>
  <key>StandardOutPath</key>
  <string>{log}</string>
  <key>StandardErrorPath</key>
  <string>{log}</string>
</dict>
</plist>
"""


def render(kind: Kind, paths: Paths) -> str:
    args = [paths.sidecar, "--config", paths.config, "serve"]
    args += ["--socket", paths.socket] if paths.socket else []
    if kind == "launchd":
        arguments = "\n".join(f"    <string>{escape(a)}</string>" for a in args)
        return _PLIST.format(label=escape(LABEL), arguments=arguments, log=escape(paths.log))
    user = kind == "user"
    head = _SYSTEMD_HEAD.format(
        scope="per-user" if user else "system",
        flag=" --user" if user else "",
        exec_start=" ".join(args),
    )
    return head + (_USER_BODY if user else _SYSTEM_BODY)


def shipped_files() -> dict[str, str]:
    """The repository's copies: relative path -> text, rendered with the shipped defaults."""
    return {
        "systemd/sidecar.service": render(
            "system",
            Paths("/opt/sidecar/venv/bin/sidecar", str(SYSTEM_CONFIG), ""),
        ),
        "systemd/sidecar-user.service": render(
            "user", Paths("%h/.local/bin/sidecar", "%E/sidecar/config.toml", "")
        ),
        "packaging/dev.sidecar.daemon.plist": render(
            "launchd", Paths("@SIDECAR@", "@CONFIG@", "", "@LOG@")
        ),
    }


def systemd_arg(value: str, *, command: bool = False) -> str:
    """A literal path as one ExecStart word: % (specifiers) and $ (variables) are escaped.

    systemd expands variables in the arguments but never in the command's path, so there
    a $ stays as it is.
    """
    value = value.replace("%", "%%")
    if not command:
        value = value.replace("$", "$$")
    if any(c in value for c in " \t\"'\\;"):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


# ---------------------------------------------------------------- where things go


def kind_for(user: bool, platform: str = sys.platform) -> Kind:
    if platform == "darwin":
        return "launchd"  # launchd agents are per-user either way
    if platform.startswith("linux"):
        return "user" if user else "system"
    raise FailedPrecondition(f"no service manager support for {platform}: run `sidecar serve`")


def file_path(kind: Kind, root: Path, home: Path, env: Mapping[str, str]) -> Path:
    if kind == "system":
        where = Path("/etc/systemd/system") / UNIT
    elif kind == "user":
        config_home = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
        where = config_home / "systemd" / "user" / UNIT
    else:
        where = home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
    return under(root, where)


def under(root: Path, path: Path) -> Path:
    return root / path.absolute().relative_to(path.absolute().anchor)


def sidecar_script(executable: str) -> Path:
    """The `sidecar` entry point beside this interpreter (not resolved: venvs symlink python)."""
    script = Path(executable).absolute().parent / "sidecar"
    if not os.access(script, os.X_OK):
        raise FailedPrecondition(
            f"no executable `sidecar` script beside {executable}: install sidecar into that "
            "environment (pip install .) and run `sidecar service install` from it"
        )
    return script


# ---------------------------------------------------------------- commands


def plan_install(
    user: bool,
    *,
    root: Path = Path("/"),
    env: Mapping[str, str],
    platform: str = sys.platform,
    executable: str = sys.executable,
    home: Path | None = None,
    config: Path | None = None,
    socket: Path | None = None,
) -> Plan:
    """What `install` would write and what to run next; touches nothing."""
    kind = kind_for(user, platform)
    home = home or Path.home()
    script = sidecar_script(executable)
    config = (config or (SYSTEM_CONFIG if kind == "system" else default_config_path())).absolute()
    socket = socket.absolute() if socket else None
    notes = _notes(config) + _socket_notes(kind, config, socket)
    path = file_path(kind, root, home, env)
    if kind == "launchd":
        log = home / "Library" / "Logs" / "sidecar" / "sidecar.log"
        paths = Paths(str(script), str(config), str(socket or ""), str(log))
        steps: tuple[str, ...] = (
            # bootstrap refuses a label that is already loaded, so a reinstall unloads first.
            f"launchctl bootout gui/$(id -u)/{LABEL} 2>/dev/null; "
            f"launchctl bootstrap gui/$(id -u) {path}",
            f"tail -f {log}",
        )
        # launchd opens StandardErrorPath itself but does not create its directory.
        dirs = (under(root, log.parent),)
        return Plan(kind, path, render(kind, paths), steps, notes, dirs)
    if kind == "system":
        sock = socket or SYSTEM_SOCKET
        sock_arg = systemd_arg(str(socket)) if socket else ""
        hidden = _hidden((script, config, sock))
        steps = (
            "id -u sidecar >/dev/null 2>&1 || useradd --system --user-group "
            "--home-dir /var/lib/sidecar --shell /usr/sbin/nologin sidecar",
            "systemctl daemon-reload && systemctl enable --now sidecar",
            "journalctl -u sidecar -f",
        )
    else:
        sock_arg = systemd_arg(str(socket)) if socket else ""
        hidden = ()  # the user unit leaves the mount-namespace options commented out
        steps = (
            "systemctl --user daemon-reload && systemctl --user enable --now sidecar",
            "loginctl enable-linger $USER   # optional: keep it running after you log out",
            "journalctl --user -u sidecar -f",
        )
    paths = Paths(systemd_arg(str(script), command=True), systemd_arg(str(config)), sock_arg)
    return Plan(kind, path, render(kind, paths), steps, notes, hidden=hidden)


def _socket_notes(kind: Kind, config: Path, socket: Path | None) -> tuple[str, ...]:
    """Where the unit's daemon listens and where clients look must be the one config key."""
    try:
        named = load_client(Overrides(config=config), env={}).socket if config.exists() else None
    except ConfigError as e:
        return (f"{config}: {e}",)
    if socket is not None:
        if named == socket:
            return ()
        return (
            f"the service gets --socket {socket}, which clients do not read: set "
            f'socket = "{socket}" under [server] in {config} too, or `sidecar status` looks '
            "elsewhere",
        )
    if kind != "system" or (named is not None and named.parent == SYSTEM_SOCKET.parent):
        return ()  # a user daemon's default socket is where its user's clients look
    return (
        f'{config} must set server.socket ([server] socket = "{SYSTEM_SOCKET}"): the '
        f"system daemon can create its socket only in {SYSTEM_SOCKET.parent} (its "
        "RuntimeDirectory), and `sidecar status` finds it there through that key",
    )


def _notes(config: Path) -> tuple[str, ...]:
    if config.exists():
        return ()
    return (
        f"{config} does not exist yet: the service needs it, with at least one [models.NAME] table",
    )


# Where the system unit's sandbox hides a path from the service, and the directive that does it.
_HOME = "in a home directory, which ProtectHome=yes hides from the service"
_TMP = "under /{0}, which PrivateTmp=yes hides from the service (it gets an empty private /{0})"
_SANDBOXED = (
    (("home",), _HOME),
    (("root",), _HOME),
    (("tmp",), _TMP.format("tmp")),
    (("var", "tmp"), _TMP.format("var/tmp")),
)


def _hidden(paths: Sequence[Path]) -> tuple[str, ...]:
    """Paths in ExecStart the system unit's service would not see (an ExecStart binary under
    /tmp fails with 203/EXEC; a socket there is invisible to every client)."""
    out = []
    for p in paths:
        why = next((w for parts, w in _SANDBOXED if p.parts[1 : 1 + len(parts)] == parts), None)
        if why is not None:
            out.append(
                f"{p} is {why}: use /opt/sidecar/venv for the program, "
                "/etc/sidecar for the config and /run/sidecar for the socket"
            )
    return tuple(out)


def install(plan: Plan) -> None:
    """Write the file atomically (a half-written unit must never be loaded)."""
    for d in (plan.path.parent, *plan.make_dirs):
        d.mkdir(parents=True, exist_ok=True)
    tmp = plan.path.with_name(plan.path.name + ".partial")
    tmp.write_text(plan.text)
    tmp.chmod(0o644)
    os.replace(tmp, plan.path)


def uninstall(
    user: bool,
    *,
    root: Path = Path("/"),
    env: Mapping[str, str],
    platform: str = sys.platform,
    home: Path | None = None,
) -> tuple[list[Path], tuple[str, ...]]:
    """Remove the file and the enablement link `systemctl enable` made; return both."""
    kind = kind_for(user, platform)
    path = file_path(kind, root, home or Path.home(), env)
    wants = {"system": "multi-user.target.wants", "user": "default.target.wants"}
    candidates = [path] + ([path.parent / wants[kind] / UNIT] if kind in wants else [])
    removed = []
    for p in candidates:
        if p.is_file() or p.is_symlink():
            p.unlink()
            removed.append(p)
    steps = {
        "system": ("systemctl stop sidecar; systemctl daemon-reload",),
        "user": ("systemctl --user stop sidecar; systemctl --user daemon-reload",),
        "launchd": (f"launchctl bootout gui/$(id -u)/{LABEL}",),
    }[kind]
    return removed, steps


Probe = Callable[[Sequence[str]], str | None]


def run_probe(argv: Sequence[str]) -> str | None:
    """The command's answer as one line; None when the command does not exist here."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"
    out, err = done.stdout.strip(), done.stderr.strip()
    if argv[0] == "launchctl":
        state = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("state =")]
        out = state[0] if state else ""
    first_err = err.splitlines()[0] if err else ""
    if out and first_err:
        return f"{out} ({first_err})"
    return out or f"unknown ({first_err or f'exit code {done.returncode}'})"


def status(
    user: bool,
    *,
    root: Path = Path("/"),
    env: Mapping[str, str],
    platform: str = sys.platform,
    home: Path | None = None,
    probe: Probe = run_probe,
) -> Status:
    kind = kind_for(user, platform)
    path = file_path(kind, root, home or Path.home(), env)
    if kind == "launchd":
        state = probe(["launchctl", "print", f"gui/{os.getuid()}/{LABEL}"])
        elsewhere = None
    else:
        state = probe(["systemctl", *(["--user"] if user else []), "is-active", "sidecar"])
        other = file_path("system" if user else "user", root, home or Path.home(), env)
        elsewhere = other if other.is_file() else None
    return Status(kind, path, path.is_file(), state, elsewhere)
