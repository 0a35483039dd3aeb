"""One generation, three ways: llama-cpp-python in this process, the daemon over its
socket, and llama-cpp-python's own OpenAI-compatible server over loopback HTTP.

Each `stream` returns dict(ttft, total, tokens, text, finish), times in seconds measured
here; each `complete` returns the completion tokens of a non-streamed request.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from benchmarks.common import Log
from benchmarks.procs import Children, free_port
from benchmarks.serving_workload import BATCH
from sidecar.client import Client

now = time.perf_counter
log = Log("bench")


class InProcess:
    name = "in-process"

    def __init__(self, model: Path, threads: int, context: int) -> None:
        import llama_cpp

        # Any: llama-cpp-python's annotations are partial (untyped methods, unions of
        # streamed and whole replies that only the `stream` argument tells apart).
        self.llm: Any = llama_cpp.Llama(
            model_path=str(model),
            n_ctx=context,
            n_batch=BATCH,
            n_ubatch=BATCH,
            n_threads=threads,
            n_threads_batch=threads,
            seed=0,
            verbose=False,
        )

    def close(self) -> None:
        self.llm.close()

    def stream(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        self.llm.reset()  # no KV prefix reuse: every request starts cold, as in the daemon
        t0 = now()
        ttft = None
        parts: list[str] = []
        finish = None
        n_text = 0
        for ch in self.llm.create_completion(
            prompt, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0, stream=True
        ):
            c = ch["choices"][0]
            if ttft is None:
                ttft = now() - t0
            if c["text"]:
                parts.append(c["text"])
                n_text += 1
            finish = c.get("finish_reason") or finish
        total = now() - t0
        tokens = max_tokens if finish == "length" else n_text
        return {
            "ttft": ttft,
            "total": total,
            "tokens": tokens,
            "text": "".join(parts),
            "finish": finish,
        }

    def complete(self, prompt: str, max_tokens: int) -> int:
        self.llm.reset()
        r = self.llm.create_completion(
            prompt, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0
        )
        return int(r["usage"]["completion_tokens"])


def daemon_stream(
    client: Client, prompt: str, max_tokens: int, budget_s: float | None = None
) -> dict[str, Any]:
    """GenerateStream. With `budget_s`, give up (cancel) after that long and count the
    chunks received so far (about one per token) instead of the final usage."""
    t0 = now()
    ttft = None
    summary = None
    chunks = 0
    call: Any = client.generate_stream(prompt, max_tokens=max_tokens)  # a grpc call: cancel()
    for ch in call:
        if ch.HasField("summary"):
            summary = ch.summary
            continue
        chunks += 1
        if ttft is None:
            ttft = now() - t0
        if budget_s is not None and now() - t0 > budget_s:
            call.cancel()
            break
    total = now() - t0
    if summary is None:  # cut short by the budget
        return {
            "ttft": ttft if ttft is not None else total,
            "total": total,
            "tokens": chunks,
            "text": "",
            "finish": f"cut after {budget_s}s",
        }
    return {
        "ttft": ttft,
        "total": total,
        "tokens": summary.usage.completion_tokens,
        "text": summary.text,
        "finish": "length" if summary.finish_reason == 2 else "stop",
        "server_first_token_ms": summary.timings.first_token_ms,
        "server_total_ms": summary.timings.total_ms,
    }


def daemon_unary(client: Client, prompt: str, max_tokens: int) -> dict[str, Any]:
    """Generate (not streamed): the client sees only the end, so `ttft` is the daemon's
    own first-token time (request received -> first token) and `total` is the client's."""
    t0 = now()
    r = client.generate(prompt, max_tokens=max_tokens)
    total = now() - t0
    return {
        "ttft": r.timings.first_token_ms / 1000,
        "total": total,
        "tokens": r.usage.completion_tokens,
        "text": r.text,
        "finish": "length" if r.finish_reason == 2 else "stop",
        "server_first_token_ms": r.timings.first_token_ms,
        "server_total_ms": r.timings.total_ms,
    }


def daemon_complete(client: Client, prompt: str, max_tokens: int) -> int:
    return int(client.generate(prompt, max_tokens=max_tokens).usage.completion_tokens)


class LlamaServer:
    name = "llama_cpp.server"

    def __init__(
        self, children: Children, model: Path, threads: int, context: int, tmp: Path
    ) -> None:
        self.children = children
        self.port = free_port()
        self.logfile = tmp / "llama_cpp_server.log"
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
               "--host", "127.0.0.1", "--port", str(self.port),
               "--n_ctx", str(context), "--n_threads", str(threads),
               "--n_threads_batch", str(threads), "--n_batch", str(BATCH),
               "--n_ubatch", str(BATCH)]  # fmt: skip
        t0 = now()
        self.proc = children.spawn(cmd, self.logfile)
        self._wait_ready(timeout=180)
        self.startup_s = now() - t0
        log(f"llama_cpp.server on 127.0.0.1:{self.port} ready in {self.startup_s:.1f}s")

    def _wait_ready(self, timeout: float) -> None:
        deadline = now() + timeout
        while now() < deadline:
            if self.proc.poll() is not None:
                tail = self.logfile.read_text(errors="replace").splitlines()[-20:]
                raise RuntimeError(
                    f"llama_cpp.server exited {self.proc.returncode}:\n" + "\n".join(tail)
                )
            with suppress(OSError, http.client.HTTPException):
                conn = self.conn()
                conn.request("GET", "/v1/models")
                r = conn.getresponse()
                r.read()
                conn.close()
                if r.status == 200:
                    return
            time.sleep(0.3)
        raise RuntimeError(f"llama_cpp.server not ready after {timeout}s")

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def close(self) -> None:
        self.children.stop(self.proc)

    @staticmethod
    def _body(prompt: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
        # repeat_penalty: the server's default is 1.1; the other two backends use none.
        return {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "repeat_penalty": 1.0,
            "seed": 0,
            **extra,
        }

    def post(
        self, conn: http.client.HTTPConnection, path: str, payload: dict[str, Any]
    ) -> dict[str, Any]:
        body = json.dumps(payload)
        for attempt in (1, 2):
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                break
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                # uvicorn drops keep-alive connections idle for 5 s; reconnect once
                conn.close()
                if attempt == 2:
                    raise
        if r.status != 200:
            raise RuntimeError(f"llama_cpp.server {path}: HTTP {r.status}: {data[:300]!r}")
        return dict(json.loads(data))

    def stream(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        conn = self.conn()
        conn.connect()
        try:
            t0 = now()
            conn.request(
                "POST",
                "/v1/completions",
                body=json.dumps(self._body(prompt, max_tokens, stream=True)),
                headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
            )
            r = conn.getresponse()
            if r.status != 200:
                raise RuntimeError(f"llama_cpp.server: HTTP {r.status}: {r.read()[:300]!r}")
            ttft = None
            parts: list[str] = []
            finish = None
            n_text = 0
            ended = "eof"
            while line := r.readline():
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    ended = "[DONE]"
                    break
                if ttft is None:
                    ttft = now() - t0
                c = json.loads(data)["choices"][0]
                if c.get("text"):
                    parts.append(c["text"])
                    n_text += 1
                finish = c.get("finish_reason") or finish
            total = now() - t0
        finally:
            conn.close()
        tokens = max_tokens if finish == "length" else n_text
        return {
            "ttft": ttft,
            "total": total,
            "tokens": tokens,
            "text": "".join(parts),
            "finish": finish,
            "ended": ended,
        }

    def complete(self, conn: http.client.HTTPConnection, prompt: str, max_tokens: int) -> int:
        payload = self._body(prompt, max_tokens)
        return int(self.post(conn, "/v1/completions", payload)["usage"]["completion_tokens"])

    def flush_cache(self) -> None:
        """Evaluate an unrelated prompt so the next request cannot reuse the previous one's KV prefix."""
        conn = self.conn()
        try:
            self.complete(conn, "Hello", 1)
        finally:
            conn.close()
