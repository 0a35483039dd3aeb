from __future__ import annotations

import os
import stat
import struct
import sys
from pathlib import Path

import pytest

from sidecar.domain.errors import FailedPrecondition, InvalidRequest, ModelNotFound
from sidecar.gguf_check import GGUFError, check
from sidecar.store import ModelStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_gguf import write_tiny_llama


@pytest.fixture
def models(tmp_path: Path) -> list[Path]:
    return [write_tiny_llama(tmp_path / f"m{i}.gguf", seed=i) for i in range(3)]


def test_sound_gguf_passes_the_check(models: list[Path]) -> None:
    info = check(models[0])
    assert info.architecture == "llama"
    assert info.tensors and info.data_start % info.alignment == 0


def corrupt(src: Path, dst: Path, how: str) -> Path:
    data = bytearray(src.read_bytes())
    if how == "truncated":
        data = data[: len(data) * 2 // 3]
    elif how == "magic":
        data[:4] = b"GGML"
    elif how == "version":
        data[4:8] = struct.pack("<I", 99)
    elif how == "tensor_offset":
        info = check(src)
        # The last tensor's offset field: point it far past the end of the file.
        name = info.tensors[-1].name.encode()
        at = bytes(data).index(name, 0, info.data_start) + len(name)
        n_dims = struct.unpack_from("<I", data, at)[0]
        off_at = at + 4 + 8 * n_dims + 4
        struct.pack_into("<Q", data, off_at, 1 << 40)
    elif how == "not_gguf":
        data = bytearray(b"hello, I am a text file\n" * 100)
    elif how == "tiny":
        data = bytearray(b"GGUF")
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("truncated", "truncated"),
        ("magic", "wrong magic"),
        ("version", "unsupported GGUF version 99"),
        ("tensor_offset", "truncated: tensor"),
        ("not_gguf", "not a GGUF file"),
        ("tiny", "not a GGUF file"),
    ],
)
def test_broken_files_are_refused_with_the_reason(
    models: list[Path], tmp_path: Path, how: str, says: str
) -> None:
    bad = corrupt(models[0], tmp_path / f"bad-{how}.gguf", how)
    with pytest.raises(GGUFError, match=says):
        check(bad)


def test_add_activate_and_previous(tmp_path: Path, models: list[Path]) -> None:
    store = ModelStore(tmp_path / "store")
    a = store.add(models[0], "clf")
    b = store.add(models[1], "clf")
    assert store.active("clf") is None
    store.activate("clf", a)
    store.activate("clf", b)
    assert store.active("clf") == b and store.previous("clf") == a
    assert store.resolve("clf", b[:12]) == b
    blob = store.blob(b)
    assert blob.read_bytes() == models[1].read_bytes()
    assert not stat.S_IMODE(blob.stat().st_mode) & 0o222  # read-only: blobs never change
    listed = {(v.name, v.short, v.active, v.previous) for v in store.all_versions()}
    assert ("clf", b[:12], True, False) in listed and ("clf", a[:12], False, True) in listed


def test_same_file_under_two_names_is_stored_once(tmp_path: Path, models: list[Path]) -> None:
    store = ModelStore(tmp_path / "store")
    a = store.add(models[0], "x")
    assert store.add(models[0], "y") == a
    assert len(list(store.blobs.glob("*.gguf"))) == 1


def test_bad_files_never_enter_the_store(tmp_path: Path, models: list[Path]) -> None:
    store = ModelStore(tmp_path / "store")
    with pytest.raises(GGUFError):
        store.add(corrupt(models[0], tmp_path / "t.gguf", "truncated"), "x")
    with pytest.raises(InvalidRequest, match="bad model name"):
        store.add(models[0], "../evil")
    assert list(store.blobs.iterdir()) == []


def test_gc_keeps_active_previous_and_in_use(tmp_path: Path, models: list[Path]) -> None:
    store = ModelStore(tmp_path / "store")
    shas = [store.add(m, "n") for m in models]
    extra = store.add(write_tiny_llama(tmp_path / "m9.gguf", seed=9), "n")
    for sha in shas:
        store.activate("n", sha)
    removed = store.gc(in_use={shas[0]})
    assert removed == [f"n@{extra[:12]}"]
    assert set(store.versions("n")) == set(shas)
    assert not store.blob(extra).exists()


def test_remove_refuses_active_and_in_use(tmp_path: Path, models: list[Path]) -> None:
    store = ModelStore(tmp_path / "store")
    a, b = store.add(models[0], "n"), store.add(models[1], "n")
    store.activate("n", a)
    with pytest.raises(FailedPrecondition, match="is active"):
        store.remove("n", a, set())
    with pytest.raises(FailedPrecondition, match="in use"):
        store.remove("n", b, {b})
    store.remove("n", b, set())
    assert not store.blob(b).exists()
    with pytest.raises(ModelNotFound):
        store.resolve("n", b)


def test_partial_files_left_by_a_crash_are_swept(tmp_path: Path, models: list[Path]) -> None:
    store = ModelStore(tmp_path / "store")
    junk = store.blobs / ".123-456.partial"
    junk.write_bytes(b"half a model")
    again = ModelStore(tmp_path / "store")
    assert junk.exists()  # opening the store is not owning it: a running daemon's copy?
    again.sweep()  # the daemon sweeps once it holds its socket
    assert not junk.exists()


def test_active_pointer_write_is_atomic(tmp_path: Path, models: list[Path]) -> None:
    store = ModelStore(tmp_path / "store")
    a = store.add(models[0], "n")
    store.activate("n", a)
    # A crash between writing the temp file and the rename leaves the old pointer intact.
    (store.models / "n" / "active.partial").write_text("garbage")
    assert store.active("n") == a
    # A pointer naming a missing blob is treated as no pointer, never as a model.
    (store.models / "n" / "active").write_text("f" * 64)
    assert store.active("n") is None


def test_quarantine_keeps_the_file_and_the_reason(tmp_path: Path, models: list[Path]) -> None:
    store = ModelStore(tmp_path / "store")
    src = tmp_path / "refused.gguf"
    src.write_bytes(models[0].read_bytes())
    dest = store.quarantine(src, "canary failed: empty output")
    assert not src.exists() and dest.exists()
    assert dest.with_name(dest.name + ".reason").read_text() == "canary failed: empty output"
    _ = os  # keep import for clarity of intent


def test_adopting_a_stored_blob_under_another_name_copies_nothing(
    tmp_path: Path, models: list[Path]
) -> None:
    store = ModelStore(tmp_path / "store")
    sha = store.add(models[0], "a")
    inode = os.stat(store.blob(sha)).st_ino
    assert store.adopt("b", sha, hold=True) == sha
    assert sha in store.versions("b") and sha in store.versions("a")
    assert os.stat(store.blob(sha)).st_ino == inode  # the same file, not a copy
    with pytest.raises(FailedPrecondition, match="being swapped in"):
        store.remove("b", sha, set())
    store.release(sha)
    with pytest.raises(ModelNotFound):
        store.adopt("c", "f" * 64)
