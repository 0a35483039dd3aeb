"""Looking for a model's plaintext where it must not be: the GGUF magic at offset 0, or a
4 KiB run of the model's own tensor bytes (random weights: found nowhere else)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from tiny_gguf import write_tiny_llama

from sidecar.gguf_check import check

RUN = 4096
# Seeds no other test uses: the scanned-for tensor bytes are this test's models' only.
SEEDS = {"a": 18_001, "b": 18_002, "c": 18_003, "bad": 18_004}


def model(d: Path, name: str) -> Path:
    return write_tiny_llama(d / f"{name}.gguf", seed=SEEDS[name], n_ctx=4096, n_embd=96)


def tensor_run(model: Path) -> bytes:
    """4 KiB from the middle of the model's biggest tensor: random weights, found nowhere
    else unless this model's plaintext is."""
    info = check(model)
    t = max(info.tensors, key=lambda t: t.nbytes)
    start = info.data_start + t.offset + t.nbytes // 2
    with model.open("rb") as f:
        f.seek(start)
        return f.read(RUN)


def files_under(root: Path, since: float, skip: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda _e: None):
        here = Path(dirpath)
        if here == skip or skip in here.parents:
            dirnames[:] = []
            continue
        for n in filenames:
            p = here / n
            try:
                st = p.lstat()
            except OSError:
                continue
            if p.is_file() and not p.is_symlink() and st.st_mtime >= since and st.st_size < 1 << 28:
                yield p


def plaintext_in(path: Path, runs: list[bytes], *, magic: bool = True) -> str | None:
    try:
        with path.open("rb") as f:
            data = f.read()
    except OSError:
        return None
    if magic and data[:4] == b"GGUF":
        return f"{path}: starts with the GGUF magic"
    for r in runs:
        if r in data:
            return f"{path}: holds a 4 KiB run of a model's tensor bytes"
    return None


def open_disk_files(pid: int) -> list[Path]:
    """The on-disk files `pid` holds open or maps (memfds and sockets are not on disk)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/") and not target.startswith("/memfd:"):
            found.append(Path(target.removesuffix(" (deleted)")))
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and not fields[5].startswith("/memfd:"):
            found.append(Path(fields[5].removesuffix(" (deleted)")))
    return found


def memfd_inodes(pid: int) -> set[str]:
    inodes = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/memfd:sidecar-"):
            inodes.add(fields[4])
    return inodes
