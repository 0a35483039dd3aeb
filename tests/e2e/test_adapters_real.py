"""LoRA adapters on the real daemon (a subprocess) with the demo model, SmolLM2-135M:
added with the CLI, applied per request, and never mixed in one decode step."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_daemon import Daemon  # type: ignore[import-not-found]

from sidecar.client import Client

pytestmark = pytest.mark.e2e

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_lora import write_lora  # noqa: E402

CONFIG = """
[models.default]
path = "{model}"
workers = 1
parallel = 2
threads = 1
"""
PROMPTS = ["The capital of France is", "My favourite colour is", "Once upon a time"]


def add(socket: Path, file: Path, name: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    done = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "models", "add", "--adapter-for", "default",
         str(file), "--name", name, "--socket", str(socket)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_adapters_change_smollm2_and_each_reply_is_its_alone_reply(
    short_dir: Path, smollm2: Path
) -> None:
    cfg = short_dir / "c.toml"
    cfg.write_text(CONFIG.format(model=smollm2))
    d = Daemon(short_dir / "d.sock", smollm2, config=cfg).wait_ready()
    try:
        for name, seed in (("a", 1), ("b", 2)):
            lora = write_lora(short_dir / f"{name}.gguf", smollm2, rank=8, alpha=16.0,
                              seed=seed, std=0.05)  # fmt: skip
            assert f"added and serving default:{name}@" in add(d.socket, lora, name)
        with Client(d.socket, timeout=120) as c:
            listed = [v.model for v in c.list_versions().versions]
            assert "default:a" in listed and "default:b" in listed

            def one(job: tuple[str, str]) -> str:
                prompt, adapter = job
                r = c.generate(prompt, max_tokens=16, adapter=adapter)
                assert r.adapter.name == adapter if adapter else not r.HasField("adapter")
                return r.text

            jobs = [(p, a) for p in PROMPTS for a in ("", "a", "b")]
            alone = {job: one(job) for job in jobs}
            for p in PROMPTS:  # each adapter changes the greedy output of the model
                assert len({alone[(p, a)] for a in ("", "a", "b")}) == 3, p
            with ThreadPoolExecutor(6) as pool:  # concurrently, two of each in flight
                together = list(pool.map(one, jobs * 2))
            assert together == [alone[j] for j in jobs * 2]
    finally:
        assert d.stop() == 0
