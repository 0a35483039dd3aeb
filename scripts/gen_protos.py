"""Generate the Python stubs for protos/ into sidecar/ (never edit them by hand).

gen_protos.py           regenerate sidecar/v1/*_pb2*.py[i]
gen_protos.py --check   exit 1 when the committed stubs differ from what protos/ gives
"""

from __future__ import annotations

import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def generate(out: Path) -> list[Path]:
    import subprocess

    from grpc_tools import protoc  # dev dependency, pinned to the grpcio runtime

    sources = sorted(PROTOS.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy={Path(sys.executable).parent / 'protoc-gen-mypy'}",
        f"--mypy_out={out}",
        *map(str, sources),
    ]
    run = subprocess.run(args, capture_output=True, text=True)  # the mypy plugin chats on stderr
    if run.returncode != 0:
        raise SystemExit(f"gen_protos: protoc failed:\n{run.stderr}")
    return sorted(p.relative_to(out) for p in out.rglob("*_pb2*.py*"))


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        if argv[:1] == ["--check"]:
            stale = [
                str(f)
                for f in files
                if not (ROOT / f).exists()
                or not filecmp.cmp(Path(tmp) / f, ROOT / f, shallow=False)
            ]
            if stale:
                print(
                    "gen_protos: stubs are stale, run scripts/gen_protos.py: " + ", ".join(stale),
                    file=sys.stderr,
                )
                return 1
            return 0
        for f in files:
            (ROOT / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / f, ROOT / f)
            print(f"gen_protos: wrote {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
