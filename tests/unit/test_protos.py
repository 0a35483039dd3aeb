from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_generated_stubs_match_the_protos() -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr


def test_proto_path_mirrors_its_package() -> None:
    text = (REPO / "protos" / "sidecar" / "v1" / "inference.proto").read_text()
    assert "package sidecar.v1;" in text
