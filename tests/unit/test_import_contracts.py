"""The layering contracts (pyproject.toml [tool.importlinter], run by scripts/check) hold on
the tree, and each would catch the import it exists to forbid."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}  # this copy of sidecar, not the installed one
    return subprocess.run(
        [str(LINT), "--no-logo", "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    shutil.copytree(
        REPO / "sidecar", tmp_path / "sidecar", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_tree_keeps_every_contract(tree: Path) -> None:
    run = lint(tree)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 kept, 0 broken" in run.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("sidecar/domain/types.py", "import sidecar.config", "Layers: nothing imports upward"),
        ("sidecar/openai_api/wire.py", "import sidecar.server.servicer", "Layers"),
        (
            "sidecar/server/convert.py",
            "import sidecar.engine.pool",
            "Front ends see only the seams",
        ),
        ("sidecar/router/policy.py", "import sidecar.worker.runner", "Only worker processes"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    tree: Path, module: str, line: str, broken: str
) -> None:
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # added by the test\n")
    run = lint(tree)
    assert run.returncode != 0
    assert broken in run.stdout.split("Broken contracts")[-1], run.stdout
