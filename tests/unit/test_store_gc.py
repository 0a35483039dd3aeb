"""What `gc` and `remove` keep (every name's pointers, versions being swapped in, names
that never served), the quarantine's bound, and reading a process's real mappings."""

from __future__ import annotations

import mmap
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.domain.errors import FailedPrecondition
from sidecar.engine.mappings import open_files
from sidecar.store import ModelStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_gguf import write_tiny_llama


@pytest.fixture
def models(tmp_path: Path) -> list[Path]:
    return [write_tiny_llama(tmp_path / f"m{i}.gguf", seed=40 + i) for i in range(4)]


def test_gc_keeps_every_names_pointers_and_names_that_never_served(
    tmp_path: Path, models: list[Path]
) -> None:
    store = ModelStore(tmp_path / "store")
    a, b, c, d = (store.add(m, "served") for m in models)
    for sha in (a, b, c):
        store.activate("served", sha)  # active c, previous b; a and d are history
    store.add(models[0], "alias")  # a and b again, under a second name
    store.add(models[1], "alias")
    store.activate("alias", b)
    store.activate("alias", a)
    staged = store.add(models[3], "staged")  # d: never activated under "staged"
    assert staged == d
    removed = store.gc(in_use=set())
    # served@a is history for "served" but alias's active: any name's pointer keeps it.
    assert removed == [f"served@{d[:12]}"]
    assert store.versions("staged") == [d] and store.blob(d).is_file()
    assert set(store.versions("served")) == {a, b, c}
    assert set(store.versions("alias")) == {a, b}


def test_a_version_being_swapped_in_is_neither_removed_nor_collected(
    tmp_path: Path, models: list[Path]
) -> None:
    store = ModelStore(tmp_path / "store")
    a = store.add(models[0], "n")
    store.activate("n", a)
    incoming = store.add(models[1], "n", hold=True)
    assert store.gc(in_use=set()) == []
    with pytest.raises(FailedPrecondition, match="being swapped in"):
        store.remove("n", incoming, set())
    store.release(incoming)
    assert store.gc(in_use=set()) == [f"n@{incoming[:12]}"]


def entry(q: Path, stamp: str, name: str, size: int = 1, copied: bool = True) -> Path:
    p = q / f"{stamp}-{name}"
    if copied:
        p.write_bytes(b"x" * size)
    (q / (p.name + ".reason")).write_text("why")
    return p


def test_quarantine_keeps_the_newest_entries_within_age_count_and_size(
    tmp_path: Path, models: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sidecar.store import quarantine

    store = ModelStore(tmp_path / "store")
    q = store.quarantine_dir
    old = time.strftime("%Y%m%dT%H%M%S", time.localtime(time.time() - 40 * 86400))
    ancient = entry(q, old + "-000000000", "ancient.gguf")
    reason_only = entry(q, old + "-000000001", "named.gguf", copied=False)
    assert store.quarantine_cleanup() == sorted([ancient.name, reason_only.name])
    assert list(q.iterdir()) == []
    # Count: only the newest QUARANTINE_KEEP entries stay, each with its reason.
    monkeypatch.setattr(quarantine, "QUARANTINE_KEEP", 3)
    for i in range(5):
        store.quarantine(models[0], f"refused {i}", move=False)  # not ours: reason only
    reasons = sorted(p.read_text() for p in q.iterdir())
    assert len(reasons) == 3 and all(
        r.startswith(("refused 2", "refused 3", "refused 4")) for r in reasons
    )
    # Size: older entries go once the newer ones fill the byte bound; the newest stays
    # even alone over it (it is the one an operator is about to look at).
    monkeypatch.setattr(quarantine, "QUARANTINE_BYTES", 10)
    dropped = tmp_path / "dropped.gguf"
    dropped.write_bytes(b"y" * 50)
    where = store.quarantine(dropped, "not a model")
    assert sorted(p.name for p in q.iterdir()) == sorted([where.name, where.name + ".reason"])


def test_quarantine_empty_removes_everything_and_nothing_outside(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    q = store.quarantine_dir
    entry(q, "20260101T000000-000000000", "a.gguf")
    entry(q, "20260101T000001-000000000", "b.gguf", copied=False)
    outside = tmp_path / "outside"
    outside.write_text("keep me")
    (q / "link").symlink_to(outside)
    removed = store.quarantine_cleanup(empty=True)
    assert len(removed) == 3 and list(q.iterdir()) == []
    assert outside.read_text() == "keep me"


def test_open_files_reads_what_a_live_process_maps(tmp_path: Path) -> None:
    target = tmp_path / "mapped.bin"
    target.write_bytes(b"\0" * mmap.PAGESIZE)
    script = (
        "import mmap,sys\n"
        "f=open(sys.argv[1],'rb'); m=mmap.mmap(f.fileno(),0,access=mmap.ACCESS_READ)\n"
        "f.close(); print('ok',flush=True); sys.stdin.read()"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script, str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == "ok\n"
        files = open_files(child.pid)
        child.stdin.close()
        child.wait(10)
    if files is None:
        pytest.skip("no /proc here")
    assert target.resolve() in files  # mapped, its descriptor already closed
    assert open_files(child.pid) == set()  # gone: maps nothing
