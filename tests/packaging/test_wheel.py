"""`python -m build` makes an sdist and a wheel with the generated stubs; the wheel alone,
installed into a fresh venv, gives a `sidecar` that serves a model."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from tiny_gguf import write_tiny_llama

pytestmark = pytest.mark.packaging

REPO = Path(__file__).resolve().parents[2]
STUBS = [
    "sidecar/v1/inference_pb2.py",
    "sidecar/v1/inference_pb2_grpc.py",
    "sidecar/v1/inference_pb2.pyi",
]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation builds with this venv's setuptools: offline, and seconds not a minute.
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    return out


def test_wheel_and_sdist_carry_the_stubs_and_nothing_extra(dist: Path) -> None:
    wheel = next(dist.glob("sidecar-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    for stub in [
        *STUBS,
        "sidecar/py.typed",
        "sidecar/openai_api/app.py",
        "sidecar/update/delta.py",
    ]:
        assert stub in names, stub
    assert not [n for n in names if n.startswith(("tests/", ".venv")) or n.endswith(".gguf")]
    sdist = next(dist.glob("sidecar-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        members = [m.split("/", 1)[1] for m in tar.getnames() if "/" in m]
    for needed in [*STUBS, "protos/sidecar/v1/inference.proto", "pyproject.toml", "README.md"]:
        assert needed in members, needed
    assert not [m for m in members if m.endswith(".gguf") or "node_modules" in m]


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=120)
    wheel = next(dist.glob("sidecar-*.whl"))
    # Dependencies come from the index (pip's cache has the llama.cpp wheel built once).
    subprocess.run([str(env / "bin" / "pip"), "install", "-q", str(wheel)], check=True, timeout=900)
    return env


def test_the_installed_command_serves_a_model(venv: Path, tmp_path: Path) -> None:
    sidecar = venv / "bin" / "sidecar"
    assert "serve" in subprocess.run([str(sidecar), "--help"], capture_output=True, text=True,
                                     check=True).stdout  # fmt: skip
    model = write_tiny_llama(tmp_path / "tiny.gguf", n_ctx=1024)
    short = Path(os.path.realpath("/tmp")) / f"sc-whl-{os.getpid()}"
    short.mkdir(exist_ok=True)
    sock = short / "s.sock"
    proc = subprocess.Popen([str(sidecar), "serve", "--model", str(model), "--socket", str(sock),
                             "--store", str(short / "store"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        probe = (
            "import sys, time\n"
            "from sidecar.client import Client\n"
            "for _ in range(300):\n"
            "    try:\n"
            f"        c = Client({str(sock)!r}, timeout=2)\n"
            "        if c.health('sidecar.v1.Inference') == 'SERVING':\n"
            "            print(c.generate('hi', max_tokens=2).model.name); sys.exit(0)\n"
            "    except Exception: pass\n"
            "    time.sleep(0.1)\n"
            "sys.exit(1)\n"
        )
        done = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0 and done.stdout.strip() == "default", done.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        assert proc.stderr is not None
        with proc.stderr:
            err = proc.stderr.read().decode()
    assert code == 0, err
    assert not sock.exists()
    shutil.rmtree(short, ignore_errors=True)
