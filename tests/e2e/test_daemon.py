"""The real daemon as a subprocess, the real client, the real demo model (SmolLM2-135M)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import jsonschema
import numpy as np
import pytest
from google.protobuf.message import Message

from sidecar.client import Client

pytestmark = pytest.mark.e2e

BANKING_LABELS = [
    "lost_or_stolen_card",
    "card_arrival",
    "exchange_rate",
    "top_up_failed",
    "pin_blocked",
    "declined_transfer",
]
INVOICE_SCHEMA = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string"},
        "invoice_number": {"type": "string"},
        "total": {"type": "number"},
        "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
    },
    "required": ["vendor", "invoice_number", "total", "currency"],
    "additionalProperties": False,
}
INVOICE = "Invoice INV-2024-117 from Northwind Traders. Amount due: 1,250.00 EUR by 30 June."


class Daemon:
    def __init__(self, socket: Path, model: Path, *extra: str, config: Path | None = None) -> None:
        self.socket = socket
        self.log = socket.with_suffix(".log")
        args = [sys.executable, "-m", "sidecar.cli"]
        if config:
            args += ["--config", str(config)]
        store = socket.parent / "store"  # never the user's store
        args += [
            "serve",
            "--socket",
            str(socket),
            "--store",
            str(store),
            "--model",
            str(model),
            *extra,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env=env)

    def wait_ready(self, timeout: float = 90) -> Daemon:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited {self.proc.returncode}: {self.log.read_text()}"
                )
            if self.socket.exists():
                try:
                    with Client(self.socket, timeout=2) as c:
                        if c.health("sidecar.v1.Inference") == "SERVING":
                            return self
                except grpc.RpcError:
                    pass
            time.sleep(0.1)
        raise AssertionError(f"daemon not ready after {timeout}s: {self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture
def start(short_dir: Path, smollm2: Path) -> Iterator:
    daemons: list[Daemon] = []

    def run(
        *extra: str, socket: Path | None = None, config: Path | None = None, ready: bool = True
    ) -> Daemon:
        d = Daemon(socket or short_dir / "d.sock", smollm2, *extra, config=config)
        daemons.append(d)
        return d.wait_ready() if ready else d

    yield run
    for d in daemons:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def stable(m: Message) -> bytes:
    copy = type(m)()
    copy.CopyFrom(m)
    copy.ClearField("timings")
    return copy.SerializeToString(deterministic=True)


def test_classify_picks_the_right_banking77_intent(start) -> None:
    d = start("--workers", "1")
    with Client(d.socket) as c:
        reply = c.classify("I think someone stole my card", BANKING_LABELS)
    assert reply.label == "lost_or_stolen_card"
    assert reply.confidence.top_probability == reply.scores[0].probability > 0.4
    assert reply.model.version == "b179c9523d0e"


def test_extract_returns_schema_valid_json(start) -> None:
    d = start("--workers", "1")
    with Client(d.socket) as c:
        reply = c.extract(INVOICE, INVOICE_SCHEMA, max_tokens=128)
    value = json.loads(reply.json)
    jsonschema.validate(value, INVOICE_SCHEMA)
    assert value["currency"] == "EUR"
    assert reply.confidence.min_logprob <= reply.confidence.mean_logprob <= 0


def test_embeddings_put_similar_texts_closer(start) -> None:
    d = start("--workers", "1")
    with Client(d.socket) as c:
        vecs = [np.array(e.values) for e in c.embed(
            ["I lost my bank card", "My card is missing", "The weather is sunny today"], normalize=True
        ).embeddings]  # fmt: skip
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]


def test_replies_are_byte_identical_across_a_daemon_restart(start, short_dir: Path) -> None:
    def ask(socket: Path) -> list[bytes]:
        with Client(socket) as c:
            return [
                stable(c.classify("I think someone stole my card", BANKING_LABELS)),
                stable(c.extract(INVOICE, INVOICE_SCHEMA, max_tokens=128)),
                stable(c.generate("The three primary colours are", max_tokens=24)),
                stable(c.chat([("user", "Name a fruit.")], max_tokens=16)),
            ]

    first = start("--workers", "2")
    before = ask(first.socket)
    assert ask(first.socket) == before  # also across the two workers
    assert first.stop() == 0
    second = start("--workers", "1")
    assert ask(second.socket) == before


def test_streamed_text_equals_the_unary_text(start) -> None:
    d = start("--workers", "1")
    with Client(d.socket) as c:
        unary = c.generate("Once upon a time", max_tokens=40)
        chunks = list(c.generate_stream("Once upon a time", max_tokens=40))
    assert "".join(ch.text for ch in chunks[:-1]) == unary.text == chunks[-1].summary.text


def test_second_daemon_on_the_same_socket_exits_nonzero(start) -> None:
    first = start("--workers", "1")
    second = start("--workers", "1", socket=first.socket, ready=False)
    assert second.proc.wait(60) == 1
    assert "already serving" in second.log.read_text()
    with Client(first.socket) as c:
        assert c.health("sidecar.v1.Inference") == "SERVING"


def test_sigterm_lets_inflight_streams_finish_then_exits_zero_and_removes_the_socket(start) -> None:
    d = start("--workers", "1")
    with Client(d.socket) as c:
        stream = c.generate_stream(
            "Once upon a time, in a small village by the sea,", max_tokens=96
        )
        first = next(stream)
        assert first.text
        d.proc.send_signal(signal.SIGTERM)
        rest = list(stream)
    assert rest[-1].summary.usage.completion_tokens >= 1
    assert d.proc.wait(30) == 0
    assert not d.socket.exists()
    with Client(d.socket, timeout=2) as c, pytest.raises(grpc.RpcError) as e:
        c.generate("x")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_kill_9_leaves_a_stale_socket_the_next_daemon_reclaims(start) -> None:
    d = start("--workers", "1")
    d.stop(signal.SIGKILL)
    assert d.socket.exists()  # left behind
    again = start("--workers", "1", socket=d.socket)
    with Client(again.socket) as c:
        assert c.classify("my card was stolen", BANKING_LABELS).label == "lost_or_stolen_card"


def test_json_logs_have_one_line_per_request(start) -> None:
    d = start("--workers", "1", "--log-format", "json")
    with Client(d.socket) as c:
        c.generate("Hi", max_tokens=2)
        with pytest.raises(grpc.RpcError):
            c.generate("")
    d.stop()
    lines = [json.loads(x) for x in d.log.read_text().splitlines() if x.startswith("{")]
    requests = [x for x in lines if x.get("method") == "/sidecar.v1.Inference/Generate"]
    assert [r["status"] for r in requests] == ["OK", "INVALID_ARGUMENT"]
    assert all(r["id"] and r["ms"] >= 0 for r in requests)


def test_cli_talks_to_the_daemon(start) -> None:
    d = start("--workers", "1")
    sidecar = [sys.executable, "-m", "sidecar.cli"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*sidecar, *args, "--socket", str(d.socket)], capture_output=True, text=True, timeout=60
        )

    out = cli(
        "classify",
        "I think someone stole my card",
        *[a for label in BANKING_LABELS for a in ("-l", label)],
    )
    assert out.returncode == 0 and out.stdout.strip() == "lost_or_stolen_card"
    out = cli("status", "--json")
    assert json.loads(out.stdout)["models"][0]["model"]["version"] == "b179c9523d0e"
    out = cli("generate", "--json", "--max-tokens", "4", "Hello")
    assert (
        json.loads(out.stdout)["usage"]["completion_tokens"] == "4"
        or json.loads(out.stdout)["usage"]["completion_tokens"] == 4
    )
    out = cli("generate", "")
    assert out.returncode == 1 and "INVALID_ARGUMENT: prompt is empty" in out.stderr
    out = cli("models")
    assert "*A  default@b179c9523d0e" in out.stdout


def test_sighup_applies_live_settings_and_names_the_rest(start, short_dir: Path) -> None:
    cfg = short_dir / "config.toml"
    cfg.write_text("[server]\nmax_labels = 10\n")
    d = start("--workers", "1", config=cfg)
    with Client(d.socket) as c:
        assert c.classify("my card was stolen", BANKING_LABELS[:4]).label

        def reloaded(text: str) -> str:
            cfg.write_text(text)
            before = c.status().last_reload
            d.proc.send_signal(signal.SIGHUP)
            for _ in range(100):
                after = c.status().last_reload
                if after and after != before:
                    return after
                time.sleep(0.05)
            raise AssertionError("no reload reported")

        note = reloaded("[server]\nmax_labels = 3\nsocket_group_access = true\n")
        assert "applied: server.max_labels" in note
        assert "need a restart (not applied): server.socket_group_access" in note
        with pytest.raises(grpc.RpcError) as e:
            c.classify("my card was stolen", BANKING_LABELS[:4])
        assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE
        note = reloaded("[server\nbroken")
        assert note.startswith("rejected, nothing changed")
        assert c.classify("my card was stolen", BANKING_LABELS[:3]).label
    assert d.stop() == 0
