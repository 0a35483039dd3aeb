"""The whole update story on the real demo model: a publisher with the CLI, a real nginx
origin, the real daemon fetching a delta, rebuilding, verifying and hot-swapping, and a
`kill -9` in the middle of a download that the restarted daemon resumes by itself."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gguf_variants import block_changed, metadata_changed
from nginx import NGINX, Nginx
from test_daemon import Daemon  # type: ignore[import-not-found]

from sidecar.client import Client

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (scripts/setup installs it)"),
]

SIDECAR = [sys.executable, "-m", "sidecar.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SIDECAR, *args], capture_output=True, text=True, timeout=300)


def ok(*args: str) -> str:
    out = run(*args)
    assert out.returncode == 0, f"{args}: {out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def serving(d: Daemon) -> str:
    with Client(d.socket, timeout=10) as c:
        return c.status().models[0].model.version


def wait_for(d: Daemon, version: str, note: str, timeout: float = 120) -> None:
    """Until `version` serves and the update's outcome (which follows the flip) is recorded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with Client(d.socket, timeout=10) as c:
                m = c.status().models[0]
            if m.model.version == version and note in m.last_update:
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not serving {version} after {timeout}s: {d.log.read_text()[-3000:]}")


def test_publish_check_apply_then_kill_9_mid_download_resumes(
    smollm2: Path, short_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    origin = tmp_path / "origin"
    key = tmp_path / "keys" / "signing.pem"
    public = ok("update", "keygen", "-o", str(key)).strip().splitlines()[0]
    assert public.startswith("ed25519:")
    v2 = metadata_changed(smollm2, tmp_path / "v2.gguf")
    v3, changed = block_changed(v2, tmp_path / "v3.gguf")
    ok(
        "update",
        "publish",
        str(origin),
        "--name",
        "default",
        "--version",
        "1",
        "--file",
        str(smollm2),
        "--key",
        str(key),
    )
    made = ok("update", "make", str(smollm2), str(v2), "-o", str(origin))
    assert "gguf" in made
    ok(
        "update",
        "publish",
        str(origin),
        "--name",
        "default",
        "--version",
        "2",
        "--file",
        str(v2),
        "--key",
        str(key),
    )

    web = Nginx(origin, tmp_path / "nginx", limit_rate="1m").start()
    config = short_dir / "sidecar.toml"
    config.write_text(
        f'[models.default]\npath = "{smollm2}"\nworkers = 1\n'
        f'update_origin = "{web.base_url}"\nupdate_key = "{public}"\n'
        "[update]\ninterval_seconds = 0\nhealthy_seconds = 5\n"
    )
    d = Daemon(short_dir / "d.sock", smollm2, config=config).wait_ready()
    try:
        sock = str(d.socket)
        v1 = serving(d)
        out = ok("update", "check", "--socket", sock)
        assert "v2 available" in out and "delta v1 -> v2" in out
        out = ok("update", "apply", "--socket", sock)
        assert "ok: default v1 -> v2" in out and "fetched" in out
        fetched = int(out.split("fetched ")[1].split(" B")[0])
        assert fetched <= 4096  # a metadata change costs kilobytes of a 98 MB model
        assert serving(d) == sha(v2)[:12] != v1
        with Client(d.socket) as c:
            assert c.generate("Hello", max_tokens=2).model.version == sha(v2)[:12]
        assert "up to date" in ok("update", "apply", "--socket", sock)

        # v3 changes a whole transformer block: a ~1 MB/s origin makes the download slow
        # enough to kill the daemon in the middle of it.
        ok("update", "make", str(v2), str(v3), "-o", str(origin))
        ok(
            "update",
            "publish",
            str(origin),
            "--name",
            "default",
            "--version",
            "3",
            "--file",
            str(v3),
            "--key",
            str(key),
        )
        applying = subprocess.Popen([*SIDECAR, "update", "apply", "--socket", sock],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        work = short_dir / "store" / "updates" / "default"
        deadline = time.monotonic() + 60
        partials: list[Path] = []
        while time.monotonic() < deadline:
            partials = [p for p in work.glob("*.partial") if p.stat().st_size > 300_000]
            if partials:
                break
            time.sleep(0.05)
        assert partials, "the download never started"
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait()
        applying.wait(30)
        cut_at = partials[0].stat().st_size
    finally:
        if d.proc.poll() is None:
            d.stop()

    # After the crash: the store still serves v2 (a partial file is never a model) and
    # the interrupted update resumes at start, by itself, with a Range request.
    web.stop()
    web = Nginx(origin, tmp_path / "nginx2")
    web.port = int(web_port(config))
    web.start()
    d = Daemon(short_dir / "d.sock", smollm2, config=config)
    try:
        d.wait_ready()
        wait_for(d, sha(v3)[:12], "v3")
        log = web.access_log()
        ranged = [line for line in log if '" 206 ' in line]
        assert ranged, log
        resent = sum(int(line.split('" 206 ')[1].split()[0]) for line in ranged)
        assert resent <= changed * 1.01 + 4096 - cut_at + 1
        with Client(d.socket) as c:
            assert c.generate("Hello", max_tokens=2).model.version == sha(v3)[:12]
            # "installed v3 ...", or already "v3 served healthily ..." after the probation
            assert "v3" in c.status().models[0].last_update
        assert not list((short_dir / "store" / "updates" / "default").glob("*.partial"))
    finally:
        d.stop()
        web.stop()


def web_port(config: Path) -> str:
    for line in config.read_text().splitlines():
        if line.startswith("update_origin"):
            return line.split(":")[-1].strip('/" ')
    raise AssertionError("no origin in the config")
