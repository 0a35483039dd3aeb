"""A delta applied on an encrypted store, on the real SmolLM2: the base read through
decryption, the target sealed on the way, peak RSS within 64 MiB (the model is never
held in memory whole)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.gguf_check import check
from sidecar.store.keys import write_new_key
from sidecar.update.delta import make_delta

pytestmark = pytest.mark.e2e

RSS_SCRIPT = """
import sys
from pathlib import Path
from sidecar.store import ModelStore
from sidecar.store.keys import Keyring, read_key_file
from sidecar.update.delta import apply_delta
store = ModelStore(Path(sys.argv[1]), Keyring(read_key_file(Path(sys.argv[2]))), encrypt=True)
def kib(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field))
    return int(line.split()[1])
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from now
before = kib("VmRSS:")
base = store.add(Path(sys.argv[3]), "m")  # sealing the base counts too
got = apply_delta(store.blob(base), Path(sys.argv[4]), Path(sys.argv[5]),
                  read_old=store.open_plain, write_out=store.open_output)
peak = kib("VmHWM:")
print(got, before, peak, store.add(Path(sys.argv[5]), "m", expect_sha256=got))
"""


def test_an_encrypted_delta_rebuild_of_smollm2_stays_within_64_mib(
    smollm2: Path, tmp_path: Path
) -> None:
    info = check(smollm2)
    t = max(info.tensors, key=lambda t: t.nbytes)
    data = bytearray(smollm2.read_bytes())
    at = info.data_start + t.offset
    data[at : at + 4096] = bytes(b ^ 0x5A for b in data[at : at + 4096])
    new = tmp_path / "new.gguf"
    new.write_bytes(bytes(data))
    del data
    made = make_delta(smollm2, new, tmp_path / "d.delta")
    key = tmp_path / "k"
    write_new_key(key)
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "store"), str(key), str(smollm2),
         str(tmp_path / "d.delta"), str(tmp_path / "rebuilt.partial")],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    got, before, peak, stored = out.stdout.split()
    assert got == stored == made.target_sha256
    assert (tmp_path / "rebuilt.partial").read_bytes()[:4] != b"GGUF"
    grew_mib = (int(peak) - int(before)) / 1024
    print(f"peak RSS grew {grew_mib:.1f} MiB")
    assert grew_mib < 64, f"peak RSS grew {grew_mib:.0f} MiB rebuilding through the store"
