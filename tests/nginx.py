"""A real nginx on loopback serving a folder: the update origin for tests.

Runs as the current user with every path in a temp dir (no root paths, no fixed port).
`limit_rate` slows transfers so a test can cut one midway (stop nginx) and resume.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

CONF = """
{user}
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 64; }}
http {{
  access_log {dir}/access.log combined;
  client_body_temp_path {dir}/tmp;
  proxy_temp_path {dir}/tmp;
  fastcgi_temp_path {dir}/tmp;
  uwsgi_temp_path {dir}/tmp;
  scgi_temp_path {dir}/tmp;
  default_type application/octet-stream;
  sendfile on;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    {rate}
  }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nginx:
    def __init__(self, root: Path, workdir: Path, limit_rate: str = "") -> None:
        if NGINX is None:
            raise RuntimeError("nginx is not installed")
        self.root = root
        self.dir = workdir
        (workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.limit_rate = limit_rate
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> Nginx:
        rate = f"limit_rate {self.limit_rate};" if self.limit_rate else ""
        conf = self.dir / "nginx.conf"
        # As root, nginx's workers would switch to `nobody`, who cannot read pytest's 0700
        # temp dirs; as anyone else the directive does not apply.
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(
            CONF.format(user=user, dir=self.dir, port=self.port, root=self.root, rate=rate)
        )
        assert NGINX is not None
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(self.dir), "-c", str(conf), "-e", str(self.dir / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(self.dir / 'error.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("nginx did not start listening")

    def stop(self) -> None:
        """Stop at once (SIGTERM = nginx's fast shutdown): open transfers are cut."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def access_log(self) -> list[str]:
        log = self.dir / "access.log"
        return log.read_text().splitlines() if log.exists() else []
