"""Routing with real parts only: the daemon serving SmolLM2, and as the cloud
`llama_cpp.server` serving Gemma 3 270M on loopback (OpenAI-compatible), reached through
a recording proxy so the test sees every byte that left the daemon.

Gemma 3 270M here is a small base model, so these tests check the plumbing and the
contracts (who answered, cost, labels and schemas kept), not the cloud's wisdom."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from conftest import GEMMA3
from fake_cloud import Script, recording_proxy
from test_daemon import BANKING_LABELS, INVOICE, INVOICE_SCHEMA, Daemon  # type: ignore[import-not-found]
from test_openai_e2e import free_port  # type: ignore[import-not-found]

from sidecar.client import Client

pytestmark = pytest.mark.e2e

MINI = Path(__file__).resolve().parents[1] / "data/banking77-mini"  # six intents, CC-BY-4.0
EMAIL = "ann.lee@example.com"


@pytest.fixture(scope="module")
def gemma_cloud() -> Iterator[str]:
    if not GEMMA3.is_file():
        pytest.fail(f"{GEMMA3} is missing: run ./scripts/setup with SIDECAR_FETCH='smollm2 gemma3'")
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="sc-gemma-")) / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(GEMMA3),
             "--model_alias", "gemma", "--host", "127.0.0.1", "--port", str(port),
             "--n_ctx", "4096", "--n_threads", "1", "--verbose", "false",
             # The GGUF carries no chat template (a base model): Gemma's turn markers.
             "--chat_format", "gemma"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/models", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(
                    f"llama_cpp.server did not start: {log.read_text()[-2000:]}"
                ) from None
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def proxy(gemma_cloud: str) -> Iterator[tuple[str, Script]]:
    with recording_proxy(gemma_cloud) as p:
        yield p


@pytest.fixture(scope="module")
def routed(smollm2: Path, proxy: tuple[str, Script]) -> Iterator[Daemon]:
    url, _ = proxy
    short = Path(tempfile.mkdtemp(prefix="sc-rt-", dir="/tmp"))
    config = short / "sidecar.toml"
    config.write_text(
        f"""
[cloud]
base_url = "{url}"
model = "gemma"
timeout_seconds = 120
prompt_price_per_mtok = 0.15
completion_price_per_mtok = 0.60
classify_threshold = 0.999
"""
    )
    d = Daemon(short / "s.sock", smollm2, "--context", "512", config=config).wait_ready()
    yield d
    d.stop()


def test_cloud_only_chat_is_answered_by_gemma_with_cost(routed: Daemon) -> None:
    with Client(routed.socket) as c:
        r = c.chat([("user", "What is the capital of France? Answer in one word.")],
                   max_tokens=16, routing="CLOUD_ONLY")  # fmt: skip
    assert r.text.strip() and r.usage.completion_tokens > 0
    assert r.route.served_by == "cloud" and r.route.reason == "routing CLOUD_ONLY"
    assert r.route.cost > 0 and r.route.cloud_latency_ms > 0 and r.usage.prompt_tokens > 0
    out = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "status", "--socket", str(routed.socket)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "cloud gemma at http://127.0.0.1" in out and "breaker closed" in out


def test_auto_escalates_an_unsure_classify_and_keeps_the_label_contract(routed: Daemon) -> None:
    with Client(routed.socket) as c:
        r = c.classify("I think someone stole my card", BANKING_LABELS)
    assert r.label in BANKING_LABELS
    assert "low local confidence: top probability" in r.route.reason
    assert r.route.HasField("local_confidence")
    # Gemma 270M either names a label (mapped) or, twice not, the local answer stands.
    assert r.route.served_by == "cloud" or r.route.reason_code == "cloud_invalid"


def test_extract_through_gemma_is_schema_valid(routed: Daemon) -> None:
    with Client(routed.socket) as c:
        r = c.extract(INVOICE, INVOICE_SCHEMA, routing="CLOUD_ONLY", timeout=180)
    jsonschema.validate(json.loads(r.json), INVOICE_SCHEMA)
    assert r.route.served_by == "cloud"


def test_a_prompt_too_long_for_the_local_context_escalates(routed: Daemon) -> None:
    long_prompt = "Summarise this in five words. " + "The card was late again. " * 120
    with Client(routed.socket) as c:
        r = c.generate(long_prompt, max_tokens=12, timeout=180)
    assert r.route.served_by == "cloud" and r.route.reason_code == "local_context"
    assert "context window" in r.route.reason and r.text


def test_nothing_sensitive_reaches_the_cloud(routed: Daemon, proxy: tuple[str, Script]) -> None:
    _url, script = proxy
    with Client(routed.socket) as c:
        r = c.classify(f"I am {EMAIL} and my card never came", BANKING_LABELS)
        assert r.route.served_by == "local" and "sensitive data (email)" in r.route.reason
        r = c.chat([("user", "Write a haiku about autumn.")], max_tokens=8, sensitive=True)
        assert r.route.served_by == "local"
    assert script.received  # the other tests did reach the cloud through this proxy
    assert not script.seen(EMAIL) and not script.seen("haiku")


def test_a_config_task_classifies_by_examples_and_reuses_its_cache(smollm2: Path) -> None:
    short = Path(tempfile.mkdtemp(prefix="sc-task-", dir="/tmp"))
    shutil.copy(MINI / "train.csv", short / "train.csv")  # 25 examples of each of 6 intents
    config = short / "sidecar.toml"
    config.write_text('[tasks.bank]\nfile = "train.csv"\nlabel_column = "category"\n')
    with (MINI / "test.csv").open(newline="") as f:
        test_rows = [(row["text"], row["category"]) for row in csv.DictReader(f)]

    def run() -> tuple[float, float]:
        d = Daemon(short / "s.sock", smollm2, config=config).wait_ready()
        try:
            with Client(d.socket) as c:
                t0 = time.monotonic()
                while c.status().cloud.tasks.get("bank") != "ready":
                    assert time.monotonic() - t0 < 600, c.status().cloud.tasks  # a hang guard
                    time.sleep(0.2)
                prepared = time.monotonic() - t0
                right = sum(c.classify(t, task="bank").label == y for t, y in test_rows)
            cli = subprocess.run(
                [sys.executable, "-m", "sidecar.cli", "classify", "--socket", str(d.socket),
                 "--task", "bank", test_rows[0][0]],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            assert cli.stdout.strip() in BANKING_LABELS
        finally:
            d.stop()
        return prepared, right / len(test_rows)

    first_s, accuracy = run()
    second_s, again = run()
    assert accuracy >= 0.6  # six intents: chance is 0.17
    assert again == accuracy  # deterministic, from the same cached vectors
    assert second_s < first_s
    assert len(list((short / "store/router/examples").glob("*.npy"))) == 1
