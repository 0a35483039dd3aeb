"""A dependency-free sd_notify client: readiness, status, reload, stop and watchdog pings.

The caller hands in the environment (`Notifier.from_env(os.environ)`); this module never
reads it, so tests and embedders decide what systemd's variables say. Without
NOTIFY_SOCKET every method is a no-op, so the daemon calls them unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("sidecar.notify")


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        """`address` is a filesystem path or an abstract name (leading NUL); None = off."""
        self._address = address
        self._watchdog_usec = watchdog_usec

    @classmethod
    def from_env(cls, env: Mapping[str, str], pid: int | None = None) -> Notifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID from `env`.

        `pid` is the process the watchdog must belong to (default: this one); a
        mismatch means the variables were inherited from a parent and are not ours.
        """
        address = _address(env.get("NOTIFY_SOCKET", ""))
        return cls(address, _watchdog_usec(env, os.getpid() if pid is None else pid))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half the timeout, the margin systemd's docs recommend."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def ready(self) -> None:
        self._send("READY=1")

    def status(self, text: str) -> None:
        # A newline would start a new assignment that systemd would try to interpret.
        self._send("STATUS=" + " ".join(text.splitlines()))

    def reloading(self) -> None:
        # systemd matches the reload to this timestamp; it must be CLOCK_MONOTONIC.
        self._send(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        if self.watchdog_interval_s is not None:
            self._send("WATCHDOG=1")

    def _send(self, message: str) -> None:
        if self._address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                # Called from the event loop: a wedged receiver must cost a lost ping, not a hang.
                s.setblocking(False)
                s.sendto(message.encode(), self._address)
        except OSError as e:
            log.debug("sd_notify %r to %r failed: %s", message, self._address, e)


def _address(raw: str) -> str | None:
    if raw.startswith("@") and len(raw) > 1:
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    if raw:  # e.g. systemd's vsock: addresses, which only VMs use
        log.debug("NOTIFY_SOCKET=%r is not a Unix socket path; notifications are off", raw)
    return None


def _watchdog_usec(env: Mapping[str, str], pid: int) -> int | None:
    raw_usec, raw_pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not raw_usec:
        return None
    try:
        usec = int(raw_usec)
        owner = int(raw_pid) if raw_pid else pid
    except ValueError:
        log.debug("ignoring malformed WATCHDOG_USEC=%r WATCHDOG_PID=%r", raw_usec, raw_pid)
        return None
    if usec <= 0 or owner != pid:
        return None
    return usec
