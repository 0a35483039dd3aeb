"""An encrypted store on the real daemon with real llama.cpp: plaintext never on disk.

The daemon serves, swaps (by path and by version), takes a drop, refuses and quarantines
bad files, all on `store.encryption = true`; then the store, the drop folder, the temp
folders and every file the daemon and its workers hold open are scanned for the GGUF
magic at offset 0 and for a 4 KiB run of each model's tensor bytes: none may be found.
A damaged blob (one flipped byte, or cut short) is refused with the reason and the daemon
keeps serving what it verified; a daemon without its key does not start, and says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from test_daemon import Daemon  # type: ignore[import-not-found]
from tiny_lora import write_lora

from sidecar.client import Client
from sidecar.store.keys import write_new_key
from sidecar.v1 import inference_pb2 as pb

pytestmark = pytest.mark.e2e

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from plaintext_scan import (  # noqa: E402
    files_under,
    memfd_inodes,
    model,
    open_disk_files,
    plaintext_in,
    tensor_run,
)


def _config(d: Path, key: Path, drop: Path, workers: int = 2) -> Path:
    cfg = d / "c.toml"
    cfg.write_text(
        f'[store]\nencryption = true\nkey_file = "{key}"\ndrop = "{drop}"\n'
        f'[models.default]\npath = "{d / "src" / "a.gguf"}"\nworkers = {workers}\n'
    )
    return cfg


def _wait(cond, what: str, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def site(short_dir: Path) -> Iterator[tuple[Path, Path, Path, dict[str, Path]]]:
    src = short_dir / "src"
    src.mkdir()
    models = {n: model(src, n) for n in ("a", "b", "c")}
    key = short_dir / "store.key"
    write_new_key(key)
    drop = short_dir / "drop"
    drop.mkdir()
    yield short_dir, key, drop, models


def test_serving_swapping_a_drop_and_quarantine_leave_no_plaintext_on_disk(site) -> None:  # type: ignore[no-untyped-def]
    d, key, drop, models = site
    started = time.time() - 1
    runs = [tensor_run(m) for m in models.values()]
    daemon = Daemon(d / "d.sock", models["a"], config=_config(d, key, drop)).wait_ready()
    try:
        with Client(daemon.socket, timeout=120) as c:
            first = c.generate("Once upon a time", max_tokens=8)
            a = first.model.version
            b = list(c.admin.Swap(pb.SwapRequest(path=str(models["b"])), timeout=300))[-1]
            assert b.new.version != a
            assert c.generate("Hello", max_tokens=4).model.version == b.new.version
            back = list(c.admin.Swap(pb.SwapRequest(version=a), timeout=300))[-1]
            assert back.new.version == a
            # A drop: copied in plaintext by the user, sealed into the store, then removed.
            shutil.copy(models["c"], drop / "c.gguf.tmp")
            os.replace(drop / "c.gguf.tmp", drop / "c.gguf")
            _wait(lambda: c.status().models[0].model.version not in (a, b.new.version), "the drop")
            # A refused drop is sealed into the quarantine, not kept in plaintext.
            data = models["a"].read_bytes()
            (drop / "cut.tmp").write_bytes(data[: len(data) // 2])
            os.replace(drop / "cut.tmp", drop / "cut.gguf")
            _wait(lambda: not (drop / "cut.gguf").exists(), "the refused drop to be taken")
            quarantined = [p for p in (d / "store" / "quarantine").iterdir()]
            assert any(p.name.endswith("cut.gguf") for p in quarantined), quarantined
            st = c.status()
            assert (
                c.generate("Still here", max_tokens=4).model.version == st.models[0].model.version
            )
            worker_pids = [w.pid for w in st.models[0].workers if w.pid]
            assert len(worker_pids) == 2
            # The workers of one version share one decrypted copy: the same memfd inode.
            shared = [memfd_inodes(p) for p in worker_pids]
            assert len(shared[0]) == 1 and shared[0] == shared[1], shared
            held: list[Path] = []
            for pid in [daemon.proc.pid, *worker_pids]:
                held += open_disk_files(pid)
        ours = set(files_under(d / "store", 0, d / "src"))
        ours |= set(files_under(drop, 0, d / "src"))
        ours |= {p for p in held if p.is_file() and d / "src" not in p.parents}
        assert any(p.parent.name == "blobs" for p in ours)
        assert any(p.parent.name == "quarantine" for p in ours)
        leaks = [why for p in sorted(ours) if (why := plaintext_in(p, runs))]
        # The temp folders are shared with other processes (other tests write GGUFs there):
        # there, only this test's models' own tensor bytes count as a leak.
        temp = set(files_under(Path(tempfile.gettempdir()), started, d / "src")) - ours
        leaks += [why for p in sorted(temp) if (why := plaintext_in(p, runs, magic=False))]
        assert leaks == [], leaks
    finally:
        daemon.stop()


def test_an_adapter_added_served_swapped_and_quarantined_leaves_no_plaintext_on_disk(site) -> None:  # type: ignore[no-untyped-def]
    """LoRA adapters are store blobs like models: sealed when added or dropped, set aside
    sealed when refused, and loaded by workers from memory only."""
    d, key, drop, models = site
    started = time.time() - 1
    src = d / "src"
    loras = {  # rank 16: each tensor pair holds more than one 4 KiB run
        n: write_lora(src / f"{n}.lora.gguf", models["a"], rank=16, std=0.3, seed=18_050 + i)
        for i, n in enumerate(("v1", "v2"))
    }
    bad = write_lora(  # another model's width: refused, and set aside
        src / "bad.lora.gguf",
        models["a"],
        rank=16,
        seed=18_059,
        shape_of=lambda _n, o, i: (o, i + 32),
    )
    runs = [tensor_run(p) for p in (*models.values(), *loras.values(), bad)]
    daemon = Daemon(d / "d.sock", models["a"], config=_config(d, key, drop, workers=1)).wait_ready()
    try:
        with Client(daemon.socket, timeout=120) as c:
            bare = c.generate("Hello w", max_tokens=8).text
            v1 = c.add_model(loras["v1"], name="fmt", adapter_for="default").version
            first = c.generate("Hello w", max_tokens=8, adapter="fmt")
            assert first.adapter.version == v1.sha256[:12] and first.text != bare
            # v2 arrives by the drop folder: sealed in, proven, swapped in, the file removed.
            (drop / "default").mkdir()
            shutil.copy(loras["v2"], drop / "default" / "fmt.tmp")
            os.replace(drop / "default" / "fmt.tmp", drop / "default" / "fmt.gguf")
            _wait(
                lambda: (
                    c.generate("Hello w", max_tokens=8, adapter="fmt").adapter.version
                    != v1.sha256[:12]
                ),
                "the dropped adapter to serve",
            )
            assert not (drop / "default" / "fmt.gguf").exists()
            shutil.copy(bad, drop / "default" / "bad.tmp")
            os.replace(drop / "default" / "bad.tmp", drop / "default" / "bad.gguf")
            _wait(lambda: not (drop / "default" / "bad.gguf").exists(), "the refused adapter")
            quarantined = list((d / "store" / "quarantine").iterdir())
            assert any(p.name.endswith("bad.gguf") for p in quarantined), quarantined
            st = c.status()
            (worker_pid,) = [w.pid for w in st.models[0].workers if w.pid]
            held: list[Path] = []
            for pid in (daemon.proc.pid, worker_pid):
                held += open_disk_files(pid)
        ours = set(files_under(d / "store", 0, src))
        ours |= set(files_under(drop, 0, src))
        ours |= {p for p in held if p.is_file() and src not in p.parents}
        assert any(p.parent.parent.name == "adapters" or "adapters" in p.parts for p in ours)
        assert any(p.parent.name == "quarantine" for p in ours)
        leaks = [why for p in sorted(ours) if (why := plaintext_in(p, runs))]
        temp = set(files_under(Path(tempfile.gettempdir()), started, src)) - ours
        leaks += [why for p in sorted(temp) if (why := plaintext_in(p, runs, magic=False))]
        assert leaks == [], leaks
    finally:
        daemon.stop()


def test_a_flipped_byte_or_a_cut_blob_is_refused_and_the_daemon_keeps_serving(site) -> None:  # type: ignore[no-untyped-def]
    d, key, drop, models = site
    daemon = Daemon(d / "d.sock", models["a"], config=_config(d, key, drop, 1)).wait_ready()
    try:
        with Client(daemon.socket, timeout=120) as c:
            a = c.status().models[0].model.version
            stored = {}
            for n in ("b", "c"):
                stored[n] = c.add_model(models[n], name="default").version.sha256
            blobs = d / "store" / "blobs"

            def damage(version: str, how: str) -> None:
                blob = next(blobs.glob(f"{version}*.gguf"))
                blob.chmod(0o644)
                raw = bytearray(blob.read_bytes())
                if how == "flip":
                    raw[len(raw) // 2] ^= 0x01
                else:
                    raw = raw[: len(raw) - 100]
                blob.write_bytes(bytes(raw))

            damage(stored["b"], "flip")
            damage(stored["c"], "cut")
            for n, words in (("b", "failed authentication"), ("c", "truncated")):
                with pytest.raises(grpc.RpcError) as e:
                    list(c.admin.Swap(pb.SwapRequest(version=stored[n]), timeout=300))
                assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert words in (e.value.details() or ""), e.value.details()
                assert c.generate("Still serving", max_tokens=4).model.version == a
            assert c.status().models[0].model.version == a
    finally:
        daemon.stop()


def test_a_daemon_without_its_key_or_with_another_says_which_key_it_needs(site) -> None:  # type: ignore[no-untyped-def]
    d, key, drop, models = site
    cfg = _config(d, key, drop, 1)
    daemon = Daemon(d / "d.sock", models["a"], config=cfg).wait_ready()
    daemon.stop()
    kid = key.read_text().strip()
    # No key at all: refused at start, naming the ways to give one.
    cfg.write_text(cfg.read_text().replace(f'key_file = "{key}"\n', ""))
    assert "no key is configured" in (err := _serve_refused(cfg, d)), err
    # Another key: the stored blob names the key it needs.
    other = d / "other.key"
    write_new_key(other)
    cfg.write_text(cfg.read_text().replace("[store]\n", f'[store]\nkey_file = "{other}"\n'))
    from sidecar.store.sealed import key_id

    assert key_id(bytes.fromhex(kid)) in (err := _serve_refused(cfg, d)), err
    # A world-readable key file is refused.
    key.chmod(0o644)
    cfg.write_text(cfg.read_text().replace(str(other), str(key)))
    assert "chmod 600" in (err := _serve_refused(cfg, d)), err


def _serve_refused(cfg: Path, d: Path) -> str:
    """What `sidecar serve` on `cfg` says as it refuses to start (its stderr's end)."""
    out = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "--config", str(cfg), "serve", "--socket",
         str(d / "e.sock"), "--store", str(d / "store")],
        capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
    )  # fmt: skip
    assert out.returncode != 0, out.stdout[-2000:]
    return out.stderr[-2000:]


def test_smollm2_serves_from_an_encrypted_store_with_its_plaintext_only_in_memory(
    short_dir: Path, smollm2: Path
) -> None:
    key = short_dir / "store.key"
    write_new_key(key)
    cfg = short_dir / "c.toml"
    cfg.write_text(
        f'[store]\nencryption = true\nkey_file = "{key}"\n'
        f'[models.default]\npath = "{smollm2}"\nworkers = 2\n'
    )
    daemon = Daemon(short_dir / "d.sock", smollm2, config=cfg).wait_ready()
    try:
        with Client(daemon.socket, timeout=120) as c:
            reply = c.generate("The capital of France is", max_tokens=8)
            assert "Paris" in reply.text, reply.text
            pids = [w.pid for w in c.status().models[0].workers if w.pid]
            shared = [memfd_inodes(p) for p in pids]
            assert len(pids) == 2 and len(shared[0]) == 1 and shared[0] == shared[1]
            held = [f for p in [daemon.proc.pid, *pids] for f in open_disk_files(p)]
        assert smollm2 not in held  # the workers map the memfd, not the configured file
        runs = [tensor_run(smollm2)]
        files = list(files_under(short_dir / "store", 0, smollm2.parent))
        assert [why for p in files if (why := plaintext_in(p, runs))] == []
    finally:
        daemon.stop()
