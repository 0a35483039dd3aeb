"""sd_notify against a real NOTIFY_SOCKET listener: the exact datagrams systemd would read."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.notify import Notifier


@dataclass
class Listener:
    notify_socket: str  # the value systemd would put in NOTIFY_SOCKET
    sock: socket.socket

    def recv(self) -> bytes:
        return self.sock.recv(4096)

    def nothing_pending(self) -> bool:
        # A Unix datagram is queued by the time sendto returns, so an empty queue right
        # after a call proves it sent nothing: no sleeping needed.
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(5.0)
        return False


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[Listener]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        name = str(short_dir / "notify")
        sock.bind(name)
    else:
        name = f"@sidecar-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        sock.bind("\0" + name[1:])
    sock.settimeout(5.0)
    with sock:
        yield Listener(name, sock)


def test_each_call_sends_one_exact_datagram(listener: Listener) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": listener.notify_socket, "WATCHDOG_USEC": "30000000"})
    assert n.enabled
    n.ready()
    n.status("serving demo on /run/sidecar/sidecar.sock")
    n.watchdog()
    n.stopping()
    assert listener.recv() == b"READY=1"
    assert listener.recv() == b"STATUS=serving demo on /run/sidecar/sidecar.sock"
    assert listener.recv() == b"WATCHDOG=1"
    assert listener.recv() == b"STOPPING=1"
    assert listener.nothing_pending()


def test_reloading_carries_the_monotonic_timestamp(listener: Listener) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": listener.notify_socket})
    before = time.monotonic_ns() // 1000
    n.reloading()
    after = time.monotonic_ns() // 1000
    m = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", listener.recv())
    assert m is not None
    assert before <= int(m.group(1)) <= after


def test_status_stays_one_assignment(listener: Listener) -> None:
    Notifier.from_env({"NOTIFY_SOCKET": listener.notify_socket}).status("line one\nREADY=1")
    assert listener.recv() == b"STATUS=line one READY=1"


def test_watchdog_interval_is_half_the_timeout() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_env(env).watchdog_interval_s == 15.0
    mine = env | {"WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_env(mine).watchdog_interval_s == 15.0
    assert Notifier.from_env(env, pid=1234).watchdog_interval_s == 15.0  # no PID: anyone's


@pytest.mark.parametrize("usec", ["", "0", "-5", "soon"])
def test_no_or_bad_watchdog_usec_means_no_watchdog(usec: str) -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": usec}
    assert Notifier.from_env(env).watchdog_interval_s is None


def test_watchdog_pid_of_another_process_disables_pings(listener: Listener) -> None:
    env = {
        "NOTIFY_SOCKET": listener.notify_socket,
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": str(os.getpid() + 1),  # inherited from a parent: not ours to pet
    }
    n = Notifier.from_env(env)
    assert n.watchdog_interval_s is None
    n.watchdog()
    n.ready()
    assert listener.recv() == b"READY=1"  # the ping before it never went out
    assert listener.nothing_pending()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    n = Notifier.from_env({"WATCHDOG_USEC": "30000000"})
    assert not n.enabled
    assert n.watchdog_interval_s is None
    n.ready()
    n.status("x")
    n.reloading()
    n.watchdog()
    n.stopping()


def test_reads_only_the_mapping_it_is_given(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.notify_socket)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    n = Notifier.from_env({})
    assert not n.enabled
    n.ready()
    assert listener.nothing_pending()


@pytest.mark.parametrize("value", ["relative/notify", "vsock:2:1234", "@"])
def test_addresses_that_are_not_unix_sockets_disable_it(value: str) -> None:
    assert not Notifier.from_env({"NOTIFY_SOCKET": value}).enabled


def test_a_missing_listener_is_logged_never_raised(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="sidecar.notify")
    n = Notifier.from_env({"NOTIFY_SOCKET": str(short_dir / "gone"), "WATCHDOG_USEC": "1000000"})
    n.ready()
    n.watchdog()
    assert "READY=1" in caplog.text and "failed" in caplog.text


def test_a_full_listener_queue_drops_pings_instead_of_blocking(listener: Listener) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": listener.notify_socket, "WATCHDOG_USEC": "2000000"})
    # The listener never reads: the kernel queue fills after a few datagrams. A blocking
    # send would hang the daemon's event loop here.
    done = threading.Event()

    def flood() -> None:
        for _ in range(1000):
            n.watchdog()
        done.set()

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    assert done.wait(5.0), "Notifier.watchdog() blocked on a full NOTIFY_SOCKET"
    assert listener.recv() == b"WATCHDOG=1"
