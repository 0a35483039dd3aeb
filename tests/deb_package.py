"""The .deb, built once per test run for every test that needs one (packaging/deb/build
takes about 40 s: the package tests and the systemd boot tests share it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_built: Path | None = None


def built_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    global _built
    if _built is None:
        out = tmp_path_factory.mktemp("deb")
        env = dict(os.environ, PYTHON=sys.executable)
        done = subprocess.run([str(REPO / "packaging" / "deb" / "build"), str(out)], env=env,
                              capture_output=True, text=True, timeout=900)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        _built = Path(done.stdout.strip().splitlines()[-1])
    return _built
