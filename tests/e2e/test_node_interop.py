"""Another language calls the daemon: a Node.js client (grpc-js, loading protos/ at run
time) against the real daemon on the real demo model, answers compared with Python's."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
from test_daemon import Daemon  # type: ignore[import-not-found]

from sidecar.client import Client

pytestmark = pytest.mark.e2e

NODE_DIR = Path(__file__).resolve().parents[1] / "interop" / "node"
NODE, NPM = shutil.which("node"), shutil.which("npm")


@pytest.fixture(scope="module")
def node_client() -> Path:
    if NODE is None or NPM is None:
        pytest.skip("node and npm are needed for the Node.js interop test")
    modules = NODE_DIR / "node_modules"
    lock = NODE_DIR / "package-lock.json"
    # `npm ci` installs exactly the committed lock file; skip it when that already happened.
    if not modules.exists() or modules.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run([NPM, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                       cwd=NODE_DIR, check=True, timeout=300)  # fmt: skip
    return NODE_DIR / "client.js"


def test_node_calls_classify_extract_and_generate_stream(
    node_client: Path, smollm2: Path, short_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    d = Daemon(short_dir / "d.sock", smollm2).wait_ready()
    try:
        assert NODE is not None
        run = subprocess.run([NODE, str(node_client), str(d.socket)], capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr
        calls = {c["call"]: c for c in map(json.loads, run.stdout.splitlines())}

        c = calls["Classify"]
        labels = ["lost_or_stolen_card", "card_arrival", "exchange_rate"]
        assert c["label"] in labels
        assert sum(s["probability"] for s in c["scores"]) == pytest.approx(1.0, abs=1e-6)

        e = calls["Extract"]
        jsonschema.validate(json.loads(e["json"]), e["schema"])

        g = calls["GenerateStream"]
        assert g["chunks"] >= 2 and g["text"] and g["text"] == g["summary_text"]
        assert g["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")

        bad = calls["BadClassify"]
        assert bad["code"] == 3 and "label" in bad["details"]

        # Byte for byte what the Python client gets (greedy decoding is deterministic).
        with Client(d.socket) as py:
            mine = py.classify("I think someone stole my card", labels)
            assert mine.label == c["label"]
            assert [s.label for s in mine.scores] == [s["label"] for s in c["scores"]]
            assert py.generate("The capital of France is", max_tokens=12).text == g["text"]
            text = "Invoice from Northwind Traders, total due 1250.00 EUR."
            assert py.extract(text, e["schema"], max_tokens=64).json == e["json"]
    finally:
        d.stop()
