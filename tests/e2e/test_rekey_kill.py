"""`sidecar models rekey` killed with SIGKILL at several points: every blob stays readable
with the old key or the new one (its header says which), a daemon given both keys keeps
serving, and running the rekey again finishes the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_daemon import Daemon  # type: ignore[import-not-found]

from sidecar.client import Client
from sidecar.store import ModelStore
from sidecar.store.keys import Keyring, read_key_file, write_new_key
from sidecar.store.sealed import needed_key
from sidecar.v1 import inference_pb2 as pb

pytestmark = pytest.mark.e2e

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_gguf import write_tiny_llama  # noqa: E402

ENV = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}


def _rekey(cfg: Path, new: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar.cli", "--config", str(cfg), "models", "rekey",
         "--new-key", str(new)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV,
    )  # fmt: skip


def test_rekey_killed_at_any_point_leaves_every_blob_readable(short_dir: Path) -> None:
    src = short_dir / "src"
    src.mkdir()
    # Bigger than one chunk each, so a kill can land inside a blob's re-sealing.
    models = [
        write_tiny_llama(src / f"m{i}.gguf", seed=18_100 + i, n_embd=256, n_ff=512, n_ctx=4096)
        for i in range(6)
    ]
    old, new = short_dir / "old.key", short_dir / "new.key"
    write_new_key(old)
    write_new_key(new)
    old_k, new_k = read_key_file(old), read_key_file(new)
    cfg = short_dir / "c.toml"
    cfg.write_text(
        f'[store]\nencryption = true\nkey_file = "{old}"\n'
        f'[models.default]\npath = "{models[0]}"\nworkers = 1\n'
    )
    daemon = Daemon(short_dir / "d.sock", models[0], config=cfg).wait_ready()
    with Client(daemon.socket, timeout=120) as c:
        shas = [c.add_model(m, name="default").version.sha256 for m in models[1:]]
    daemon.stop()
    # The daemon during a rekey: the new key current, the old one still read.
    cfg.write_text(
        f'[store]\nencryption = true\nkey_file = "{new}"\nprevious_key_file = "{old}"\n'
        f'[models.default]\npath = "{models[0]}"\nworkers = 1\n'
    )
    daemon = Daemon(short_dir / "d.sock", models[0], config=cfg).wait_ready()
    try:
        store = ModelStore(short_dir / "store", Keyring(new_k, (old_k,)))
        blobs = sorted((short_dir / "store" / "blobs").glob("*.gguf"))
        assert len(blobs) == 6
        ids = set()
        runs_cfg = short_dir / "r.toml"  # the rekey reads the old key as the current one
        runs_cfg.write_text(
            f'[store]\npath = "{short_dir / "store"}"\nencryption = true\nkey_file = "{old}"\n'
        )
        # Kill points: after the run has named its key (inside the first blob it re-seals),
        # then after 1 more blob, plus a little (inside the next one), and so on.
        for n, (after, extra) in enumerate([(0, 0.0), (1, 0.01), (1, 0.03), (2, 0.0)]):
            p = _rekey(runs_cfg, new)
            assert p.stdout is not None
            seen = 0
            while seen <= after:  # the first line names the key, then one per blob
                line = p.stdout.readline().decode()
                if not line:
                    break
                seen += line.startswith("sealing") or "resealed" in line
            time.sleep(extra)
            p.send_signal(signal.SIGKILL)
            p.communicate(timeout=60)
            for b in blobs:
                ids.add(needed_key(b))
                assert store.sha256(b) == b.stem, f"{b.name} unreadable after kill {n}"
            with Client(daemon.socket, timeout=120) as c:
                assert c.generate("Still serving", max_tokens=4).text is not None
                # A version of the mixed store loads, whichever key it is under now.
                target = shas[n % len(shas)]
                list(c.admin.Swap(pb.SwapRequest(version=target), timeout=300))
        assert len(ids) == 2, "no kill left the store with both keys in use"
        done = _rekey(runs_cfg, new)
        out = done.communicate(timeout=300)[0].decode()
        assert done.returncode == 0, out
        assert f"sealing every blob of {short_dir / 'store'}" in out, out
        assert {needed_key(b) for b in blobs} == {Keyring(new_k).current_id}, out
        for b in blobs:
            assert store.sha256(b) == b.stem
        # What the killed runs left half-written is gone: the finishing run swept it.
        assert list((short_dir / "store" / "blobs").glob(".rekey-*")) == []
    finally:
        daemon.stop()
