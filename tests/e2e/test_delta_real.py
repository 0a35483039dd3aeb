"""Deltas between SmolLM2-135M and edited versions of it: byte-identical rebuilds within
the size targets (metadata change <= 4 KiB; changed tensors <= 1.01 x their bytes + 4 KiB)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from gguf_variants import block_changed, metadata_changed, one_tensor_changed

from sidecar.gguf_check import check
from sidecar.update.delta import apply_delta, make_delta

pytestmark = pytest.mark.e2e


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize(
    ("variant", "budget"),
    [
        (lambda src, dst: (metadata_changed(src, dst), 0), "metadata"),
        (one_tensor_changed, "tensors"),
        (block_changed, "tensors"),
    ],
    ids=["a-metadata", "b-one-tensor", "c-one-block"],
)
def test_smollm2_variants_round_trip_within_target(
    smollm2: Path, tmp_path: Path, variant, budget
) -> None:  # type: ignore[no-untyped-def]
    new, changed = variant(smollm2, tmp_path / "new.gguf")
    check(new)  # still a sound GGUF
    assert sha(new) != sha(smollm2)
    d = tmp_path / "x.delta"
    make_delta(smollm2, new, d)
    out = tmp_path / "out.partial"
    assert apply_delta(smollm2, d, out, verify_base=False) == sha(new)
    size = d.stat().st_size
    limit = 4096 if budget == "metadata" else 1.01 * changed + 4096
    assert size <= limit, f"delta {size} bytes, target {limit:.0f}"
