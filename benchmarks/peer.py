"""llama.cpp's own `llama-server`, the peer `scripts/bench` measures the daemon against.

Built by `scripts/build-llama-server` from the llama.cpp vendored in the pinned
llama-cpp-python sdist (so both run the same llama.cpp), cached outside the repository.
`find_binary` returns it, or why there is none; the bench then skips the peer's column.

`LlamaCppServer` runs it on 127.0.0.1 with `np` sequence slots (continuous batching), each
slot with the daemon's context, and speaks its native `/completion` endpoint. Every request
asks for `cache_prompt: false`, so no request reuses another's KV prefix (the daemon starts
every Generate cold too), and for greedy sampling with no repetition penalty.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Log
from benchmarks.procs import Children, free_port
from benchmarks.serving_workload import BATCH

now = time.perf_counter
log = Log("bench")
BUILD = ROOT / "scripts" / "build-llama-server"
BINARY_ENV = "SIDECAR_LLAMA_SERVER"  # a llama-server binary to use instead of building one


def cores() -> int:
    """The cores this process may run on: what `-t` = cores means here."""
    return len(os.sched_getaffinity(0))


def find_binary(build: bool = True) -> tuple[Path | None, str]:
    """(the llama-server binary, "") or (None, why there is none)."""
    given = os.environ.get(BINARY_ENV)
    if given:
        p = Path(given)
        ok = p.is_file() and os.access(p, os.X_OK)
        return (p, "") if ok else (None, f"{BINARY_ENV}={given} is not an executable file")
    if not build:
        return None, "not built (the bench was asked not to build it)"
    log("llama-server: scripts/build-llama-server (cached; the first build takes ~10 min)")
    try:
        r = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"scripts/build-llama-server failed: {type(e).__name__}: {e}"
    out = r.stdout.strip().splitlines()
    if r.returncode != 0 or not out:
        tail = " | ".join(r.stderr.strip().splitlines()[-3:])
        return None, f"scripts/build-llama-server exited {r.returncode}: {tail}"[:400]
    return Path(out[-1]), ""


def version(binary: Path) -> str:
    with suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=20)
        for line in (r.stdout + r.stderr).splitlines():
            if line.startswith("version"):
                return line.strip()
    return "unknown"


class LlamaCppServer:
    """One llama-server process: `threads` threads, `np` slots of `context` tokens each."""

    def __init__(
        self,
        children: Children,
        binary: Path,
        model: Path,
        *,
        threads: int,
        np: int,
        context: int,
        tmp: Path,
    ) -> None:
        self.children = children
        self.np = np
        self.threads = threads
        self.port = free_port()
        self.logfile = tmp / f"llama-server-np{np}.log"
        # -c is the total: llama-server splits it evenly over the slots.
        cmd = [str(binary), "--model", str(model), "--host", "127.0.0.1",
               "--port", str(self.port), "-t", str(threads), "-tb", str(threads),
               "-np", str(np), "-c", str(context * np), "-b", str(BATCH), "-ub", str(BATCH),
               "--no-webui", "--cache-ram", "0"]  # fmt: skip
        t0 = now()
        self.proc = children.spawn(cmd, self.logfile)
        try:
            self._wait_healthy(timeout=120)
        except BaseException:
            children.stop(self.proc, grace=2)
            raise
        self.startup_s = now() - t0
        log(f"llama-server -t {threads} -np {np} on 127.0.0.1:{self.port} "
            f"ready in {self.startup_s:.1f}s")  # fmt: skip
        # Untimed requests beside llama-server's own warm-up: first-use costs (page faults
        # in the weights, buffer growth) stay out of the measurements.
        conn = self.conn()
        try:
            for _ in range(2):
                self.complete(conn, "Hello", 2)
        finally:
            conn.close()

    def _wait_healthy(self, timeout: float) -> None:
        deadline = now() + timeout
        while now() < deadline:
            if self.proc.poll() is not None:
                tail = self.logfile.read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError(
                    f"llama-server exited {self.proc.returncode}:\n" + "\n".join(tail)
                )
            with suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                try:
                    conn.request("GET", "/health")
                    r = conn.getresponse()
                    r.read()
                finally:
                    conn.close()
                if r.status == 200:  # 503 while the model loads
                    return
            time.sleep(0.2)
        raise RuntimeError(f"llama-server not healthy after {timeout}s")

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def close(self) -> None:
        self.children.stop(self.proc, grace=5)

    @staticmethod
    def body(prompt: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
        return {
            "prompt": prompt,
            "n_predict": max_tokens,
            "temperature": 0.0,  # greedy
            "repeat_penalty": 1.0,
            "seed": 0,
            "cache_prompt": False,
            **extra,
        }

    def post(self, conn: http.client.HTTPConnection, payload: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(payload)
        for attempt in (1, 2):
            try:
                conn.request(
                    "POST", "/completion", body=body, headers={"Content-Type": "application/json"}
                )
                r = conn.getresponse()
                data = r.read()
                break
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                conn.close()  # an idle keep-alive connection the server dropped: once more
                if attempt == 2:
                    raise
        if r.status != 200:
            raise RuntimeError(f"llama-server /completion: HTTP {r.status}: {data[:300]!r}")
        return dict(json.loads(data))

    def generate(
        self, conn: http.client.HTTPConnection, prompt: str, max_tokens: int
    ) -> tuple[int, str]:
        """(completion tokens, text) of one greedy generation."""
        r = self.post(conn, self.body(prompt, max_tokens))
        return int(r["tokens_predicted"]), str(r["content"])

    def complete(self, conn: http.client.HTTPConnection, prompt: str, max_tokens: int) -> int:
        return self.generate(conn, prompt, max_tokens)[0]

    def stream(self, prompt: str, max_tokens: int, budget_s: float | None = None) -> dict[str, Any]:
        """A streamed generation, timed here: dict(ttft, total, tokens, text, finish). With
        `budget_s`, stop reading after that long (closing the connection cancels it)."""
        conn = self.conn()
        conn.connect()
        try:
            t0 = now()
            conn.request(
                "POST",
                "/completion",
                body=json.dumps(self.body(prompt, max_tokens, stream=True)),
                headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
            )
            r = conn.getresponse()
            if r.status != 200:
                raise RuntimeError(f"llama-server: HTTP {r.status}: {r.read()[:300]!r}")
            ttft = None
            parts: list[str] = []
            last: dict[str, Any] = {}
            while line := r.readline():
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                last = json.loads(line[5:])
                if last.get("content"):
                    if ttft is None:
                        ttft = now() - t0
                    parts.append(last["content"])
                if last.get("stop"):
                    break
                if budget_s is not None and now() - t0 > budget_s:
                    last = {"tokens_predicted": len(parts), "stop_type": f"cut after {budget_s}s"}
                    break
            total = now() - t0
        finally:
            conn.close()
        return {
            "ttft": ttft if ttft is not None else total,
            "total": total,
            "tokens": int(last.get("tokens_predicted", len(parts))),
            "text": "".join(parts),
            "finish": str(last.get("stop_type", "eof")),
        }
