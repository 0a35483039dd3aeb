"""Deltas from a compromised or careless publisher: hand-made, hostile ops and headers.

A signature only says who made a delta, not that it is sane. Sizes come from the signed
manifest (passed in as `target_size`), never from the delta; memory stays bounded
whatever a zstd frame declares; anything malformed is a DeltaError (the updater then
falls back to the full file).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from sidecar.update import delta as dmod
from sidecar.update.delta import DeltaError, apply_delta, make_delta, read_delta_info

GIB = 1 << 30


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def craft(path: Path, base: bytes, head: object, ops: bytes) -> Path:
    """A delta file with the given header (any JSON) and raw op bytes."""
    raw = json.dumps(head).encode()
    path.write_bytes(dmod.MAGIC + struct.pack("<I", len(raw)) + raw + ops + bytes([dmod.END]))
    return path


def header(base: bytes, target: bytes, **over: object) -> dict[str, object]:
    h: dict[str, object] = {
        "base_sha256": sha(base),
        "base_size": len(base),
        "target_sha256": sha(target),
        "target_size": len(target),
        "mode": "cdc",
    }
    return h | over


def bomb(declared: int) -> bytes:
    """A zstd frame of `declared` zero bytes that says so in its header: ~32 KB per GiB."""
    c = zstandard.ZstdCompressor(level=1).compressobj(size=declared)
    zero = bytes(1 << 20)
    out = [c.compress(zero) for _ in range(declared >> 20)]
    out.append(c.flush())
    return b"".join(out)


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, bytes, bytes]:
    base = os.urandom(64 * 1024)
    target = base[: 32 * 1024] + b"new bytes" + base[32 * 1024 :]
    old = tmp_path / "old.bin"
    old.write_bytes(base)
    return old, base, target


def data_op(raw: bytes) -> bytes:
    z = zstandard.ZstdCompressor().compress(raw)
    return struct.pack("<BII", dmod.DATA, len(raw), len(z)) + z


# ---------------------------------------------------------------- memory


RSS_SCRIPT = """
import resource, sys
from pathlib import Path
from sidecar.update.delta import DeltaError, apply_delta
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    apply_delta(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), verify_base=False)
    print("applied", before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
except DeltaError as e:
    print("refused", before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, e)
"""


@pytest.mark.parametrize("kind", ["data", "xor", "dict", "copies"])
def test_a_zstd_frame_declaring_a_gib_is_refused_in_bounded_memory(
    files: tuple[Path, bytes, bytes], tmp_path: Path, kind: str
) -> None:
    old, base, target = files
    z = bomb(GIB)
    assert len(z) < 64 * 1024  # a small op...
    raw_len = 100  # ...that says it holds 100 bytes, in a frame that says 1 GiB
    if kind == "data":
        op = struct.pack("<BII", dmod.DATA, raw_len, len(z)) + z
    elif kind == "xor":
        op = struct.pack("<BQII", dmod.XOR, 0, raw_len, len(z)) + z
    elif kind == "dict":
        op = struct.pack("<BQIII", dmod.DICT, 0, 1024, raw_len, len(z)) + z
    else:
        op = struct.pack("<BII", dmod.COPIES, 2, len(z)) + z  # 2 pairs = 32 bytes
    d = craft(tmp_path / "bomb.delta", base, header(base, target), op)
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(old), str(d), str(tmp_path / "o")],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    verdict, before, peak, *why = out.stdout.split(maxsplit=3)
    assert verdict == "refused", out.stdout
    grew_mib = (int(peak) - int(before)) / 1024  # ru_maxrss is in KiB on Linux
    assert grew_mib < 64, f"peak RSS grew {grew_mib:.0f} MiB applying a 1 GiB bomb"
    assert "bytes, its op says" in why[0] or "corrupt" in why[0]


def test_a_well_made_delta_still_applies_through_the_bounded_reader(
    files: tuple[Path, bytes, bytes], tmp_path: Path
) -> None:
    old, _base, target = files
    new = tmp_path / "new.bin"
    new.write_bytes(target)
    d = make_delta(old, new, tmp_path / "ok.delta")
    assert apply_delta(old, tmp_path / "ok.delta", tmp_path / "o", target_size=len(target)) == (
        d.target_sha256
    )
    assert (tmp_path / "o").read_bytes() == target


# ---------------------------------------------------------------- sizes


def test_a_delta_declaring_a_bigger_target_than_the_manifest_is_refused_before_writing(
    files: tuple[Path, bytes, bytes], tmp_path: Path
) -> None:
    old, base, target = files
    # The delta says (and writes) 50x the file the manifest declares.
    big = 50 * len(target)
    ops = struct.pack("<BQQ", dmod.COPY, 0, len(base)) * 50
    d = craft(tmp_path / "x.delta", base, header(base, target, target_size=big), ops)
    out = tmp_path / "o"
    with pytest.raises(DeltaError, match=f"manifest says {len(target)}"):
        apply_delta(old, d, out, target_size=len(target))
    assert not out.exists() or out.stat().st_size == 0


def test_ops_that_write_past_the_declared_size_stop_at_it(
    files: tuple[Path, bytes, bytes], tmp_path: Path
) -> None:
    old, base, target = files
    # The header agrees with the manifest; the ops do not: copies forever.
    ops = struct.pack("<BQQ", dmod.COPY, 0, len(base)) * 50
    d = craft(tmp_path / "x.delta", base, header(base, target), ops)
    seen: list[int] = []
    out = tmp_path / "o"
    with pytest.raises(DeltaError, match="runs past the"):
        apply_delta(old, d, out, target_size=len(target),
                    progress=lambda done, total: seen.append(done))  # fmt: skip
    assert out.stat().st_size <= len(target)
    assert max(seen, default=0) <= len(target)


def test_a_huge_copy_is_refused_before_it_starts(
    files: tuple[Path, bytes, bytes], tmp_path: Path
) -> None:
    old, base, target = files
    d = craft(tmp_path / "x.delta", base, header(base, target),
              struct.pack("<BQQ", dmod.COPY, 0, 1 << 63))  # fmt: skip
    with pytest.raises(DeltaError):
        apply_delta(old, d, tmp_path / "o", target_size=len(target))
    assert (tmp_path / "o").stat().st_size == 0


def test_a_max_size_caps_what_the_delta_may_claim(
    files: tuple[Path, bytes, bytes], tmp_path: Path
) -> None:
    old, base, target = files
    d = craft(tmp_path / "x.delta", base, header(base, target, target_size=GIB), b"")
    with pytest.raises(DeltaError, match="over the"):
        apply_delta(old, d, tmp_path / "o", max_size=1 << 20)


# ---------------------------------------------------------------- malformed headers


@pytest.mark.parametrize(
    "head",
    [
        {"base_size": "65536"},
        {"base_size": 65536.5},
        {"target_size": None},
        {"target_size": [1]},
        {"target_size": True},
        {"target_size": -1},
        {"base_sha256": 123},
        {"target_sha256": "not hex"},
        {"mode": 7},
    ],
    ids=lambda h: "-".join(f"{k}={v!r}" for k, v in h.items()),
)
def test_a_wrongly_typed_header_field_is_a_delta_error(
    files: tuple[Path, bytes, bytes], tmp_path: Path, head: dict[str, object]
) -> None:
    old, base, target = files
    d = craft(tmp_path / "x.delta", base, header(base, target, **head), data_op(target))
    with pytest.raises(DeltaError, match="delta header"):
        read_delta_info(d)
    with pytest.raises(DeltaError, match="delta header"):
        apply_delta(old, d, tmp_path / "o", target_size=len(target))


@pytest.mark.parametrize("head", [[1, 2, 3], "a string", 42, None])
def test_a_header_that_is_not_an_object_is_a_delta_error(
    files: tuple[Path, bytes, bytes], tmp_path: Path, head: object
) -> None:
    old, base, target = files
    d = craft(tmp_path / "x.delta", base, head, data_op(target))
    with pytest.raises(DeltaError):
        apply_delta(old, d, tmp_path / "o")


def test_a_deeply_nested_header_is_a_delta_error(
    files: tuple[Path, bytes, bytes], tmp_path: Path
) -> None:
    old, _base, _target = files
    nested = b"[" * 60_000 + b"]" * 60_000
    d = tmp_path / "x.delta"
    d.write_bytes(dmod.MAGIC + struct.pack("<I", len(nested)) + nested + bytes([dmod.END]))
    with pytest.raises(DeltaError):
        apply_delta(old, d, tmp_path / "o")
