"""The delta format on small files: byte-identical rebuilds, sizes, and every refusal."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from gguf_variants import one_tensor_changed, sparse_edits, tensors_reordered
from tiny_gguf import write_tiny_llama

from sidecar.fileio import sha256_file
from sidecar.gguf_check import check
from sidecar.update import delta as dmod
from sidecar.update.delta import DeltaError, apply_delta, make_delta, read_delta_info


def round_trip(old: Path, new: Path, tmp: Path) -> int:
    d = tmp / "x.delta"
    info = make_delta(old, new, d)
    out = tmp / "out.partial"
    got = apply_delta(old, d, out)
    assert got == sha256_file(new) == info.target_sha256
    assert out.read_bytes() == new.read_bytes()
    assert read_delta_info(d).base_sha256 == sha256_file(old)
    return d.stat().st_size


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return write_tiny_llama(tmp_path / "a.gguf", seed=1, n_layer=4, n_embd=128, n_ff=256)


def test_metadata_change_costs_a_few_hundred_bytes(base: Path, tmp_path: Path) -> None:
    new = write_tiny_llama(tmp_path / "b.gguf", seed=1, n_layer=4, n_embd=128, n_ff=256,
                           chat_template="{{ x }} a new template")  # fmt: skip
    assert round_trip(base, new, tmp_path) < 1024


def test_identical_files_cost_almost_nothing(base: Path, tmp_path: Path) -> None:
    assert round_trip(base, base, tmp_path) < 1024


def test_one_changed_tensor_costs_about_its_bytes(base: Path, tmp_path: Path) -> None:
    new, changed = one_tensor_changed(base, tmp_path / "c.gguf")
    size = round_trip(base, new, tmp_path)
    assert size <= 1.01 * changed + 4096


def test_reordered_tensors_cost_nothing(base: Path, tmp_path: Path) -> None:
    new = tensors_reordered(base, tmp_path / "r.gguf")
    assert new.read_bytes() != base.read_bytes()
    assert round_trip(base, new, tmp_path) < 4096


def test_sparse_edits_travel_as_small_xors(base: Path, tmp_path: Path) -> None:
    new, changed = sparse_edits(base, tmp_path / "s.gguf", tensor_fraction=0.3, row_fraction=0.05)
    size = round_trip(base, new, tmp_path)
    assert size < changed / 4  # far below sending the changed tensors whole


def test_a_seed_change_is_a_full_rewrite_but_still_correct(base: Path, tmp_path: Path) -> None:
    new = write_tiny_llama(tmp_path / "d.gguf", seed=9, n_layer=4, n_embd=128, n_ff=256)
    assert round_trip(base, new, tmp_path) <= 1.01 * new.stat().st_size + 4096


def test_non_gguf_files_dedupe_shifted_data_by_chunks(tmp_path: Path) -> None:
    rnd = random.Random(3)
    data = rnd.randbytes(3_000_000)
    old, new = tmp_path / "o.bin", tmp_path / "n.bin"
    old.write_bytes(data)
    new.write_bytes(data[:1_000_000] + b"inserted!" * 50 + data[1_000_000:])
    size = round_trip(old, new, tmp_path)
    assert read_delta_info(tmp_path / "x.delta").mode == "cdc"
    assert size < 400_000  # a few chunks around the insertion, not the shifted 2 MB


def test_empty_and_tiny_files(tmp_path: Path) -> None:
    empty, small = tmp_path / "e", tmp_path / "s"
    empty.write_bytes(b"")
    small.write_bytes(b"hello")
    round_trip(empty, small, tmp_path)
    round_trip(small, empty, tmp_path)


def test_the_wrong_base_is_refused(base: Path, tmp_path: Path) -> None:
    new = write_tiny_llama(tmp_path / "b.gguf", seed=2, n_layer=4, n_embd=128, n_ff=256)
    make_delta(base, new, tmp_path / "x.delta")
    other = tmp_path / "other.gguf"
    data = bytearray(base.read_bytes())
    data[-1] ^= 1
    other.write_bytes(bytes(data))
    with pytest.raises(DeltaError, match="not the one"):
        apply_delta(other, tmp_path / "x.delta", tmp_path / "o")
    shorter = tmp_path / "shorter.gguf"
    shorter.write_bytes(base.read_bytes()[:-64])
    with pytest.raises(DeltaError, match="bytes; this delta needs"):
        apply_delta(shorter, tmp_path / "x.delta", tmp_path / "o")


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "append"])
def test_a_damaged_delta_is_detected(base: Path, tmp_path: Path, damage: str) -> None:
    new, _ = one_tensor_changed(base, tmp_path / "c.gguf")
    d = tmp_path / "x.delta"
    make_delta(base, new, d)
    data = bytearray(d.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    else:
        data += b"\0"
    d.write_bytes(bytes(data))
    with pytest.raises(DeltaError):
        apply_delta(base, d, tmp_path / "o", verify_base=False)


def test_apply_works_in_bounded_pieces(base: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(dmod, "PIECE", 4096)
    new, _ = one_tensor_changed(base, tmp_path / "c.gguf")
    d = tmp_path / "x.delta"
    make_delta(base, new, d)
    reads: list[int] = []
    real = dmod._exact

    def spy(f, n):  # type: ignore[no-untyped-def]
        reads.append(n)
        return real(f, n)

    monkeypatch.setattr(dmod, "_exact", spy)
    assert apply_delta(base, d, tmp_path / "o") == sha256_file(new)
    # Payloads and source reads never exceed a piece; the one exception is the old
    # header, the dictionary for the new one (its size is the vocabulary's, not the model's).
    header = check(base).data_start
    assert sorted(reads)[-2] <= 4096 + 1024 and max(reads) <= max(header, 4096 + 1024)
