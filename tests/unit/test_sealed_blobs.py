"""The sealed blob format and the encrypted store's reads and writes, on real files."""

from __future__ import annotations

import io
import os
import stat
import struct
from pathlib import Path

import pytest
from tiny_gguf import write_tiny_llama

from sidecar.store import ModelStore
from sidecar.store import sealed as s
from sidecar.store.keys import Keyring, load_keyring, read_key_file, write_new_key
from sidecar.update import delta

KEY = bytes(range(32))
KEYS = {s.key_id(KEY): KEY}


def seal(tmp_path: Path, data: bytes, chunk: int = 1000, key: bytes = KEY) -> Path:
    p = tmp_path / f"sealed-{len(data)}"
    with p.open("wb") as f:
        assert (
            s.seal_stream(io.BytesIO(data), f, key, chunk)
            == __import__("hashlib").sha256(data).hexdigest()
        )
    return p


def read_all(p: Path, keys: dict[str, bytes] = KEYS) -> bytes:
    with s.open_sealed(p, keys) as r:
        return r.read()


@pytest.mark.parametrize("n", [0, 1, 999, 1000, 1001, 4500])
def test_sealed_bytes_read_back_whole_and_at_any_offset(tmp_path: Path, n: int) -> None:
    data = os.urandom(n)
    p = seal(tmp_path, data)
    assert read_all(p) == data
    with s.open_sealed(p, KEYS) as r:
        assert r.size == n
        r.seek(n // 3)
        assert r.read(1500) == data[n // 3 : n // 3 + 1500]
    assert data[:16] not in p.read_bytes() or n < 16


def damaged(p: Path, how: str) -> None:
    raw = bytearray(p.read_bytes())
    step = 1000 + s.TAG
    if how == "flip":
        raw[s.HEADER_SIZE + step + 7] ^= 1
    elif how == "cut_at_boundary":
        raw = raw[: s.HEADER_SIZE + 2 * step]
    elif how == "cut_inside":
        raw = raw[: len(raw) - 5]
    elif how == "swap_chunks":
        a = raw[s.HEADER_SIZE : s.HEADER_SIZE + step]
        b = raw[s.HEADER_SIZE + step : s.HEADER_SIZE + 2 * step]
        raw[s.HEADER_SIZE : s.HEADER_SIZE + 2 * step] = b + a
    elif how == "header_chunk_size":
        struct.pack_into("<I", raw, 18, 999)
    p.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "how", ["flip", "cut_at_boundary", "cut_inside", "swap_chunks", "header_chunk_size"]
)
def test_any_damage_is_detected_and_nothing_unauthenticated_is_returned(
    tmp_path: Path, how: str
) -> None:
    p = seal(tmp_path, os.urandom(4500))
    damaged(p, how)
    with pytest.raises(s.Damaged, match=r"failed authentication|truncated"):
        read_all(p)


def test_a_chunk_from_another_blob_under_the_same_key_is_refused(tmp_path: Path) -> None:
    one, two = seal(tmp_path, os.urandom(3000)), seal(tmp_path, os.urandom(3001))
    raw1, raw2 = bytearray(one.read_bytes()), two.read_bytes()
    step = 1000 + s.TAG
    raw1[s.HEADER_SIZE : s.HEADER_SIZE + step] = raw2[s.HEADER_SIZE : s.HEADER_SIZE + step]
    one.write_bytes(bytes(raw1))
    with pytest.raises(s.Damaged):
        read_all(one)


def test_a_blob_names_the_key_it_needs(tmp_path: Path) -> None:
    other = os.urandom(32)
    p = seal(tmp_path, b"x" * 10, key=other)
    with pytest.raises(s.MissingKey) as e:
        read_all(p)
    assert s.key_id(other) in e.value.message and s.key_id(KEY) in e.value.message
    assert s.needed_key(p) == s.key_id(other)


def test_key_files_must_be_ours_and_private_and_keygen_never_overwrites(tmp_path: Path) -> None:
    k = tmp_path / "k"
    kid = write_new_key(k)
    assert stat.S_IMODE(k.stat().st_mode) == 0o600
    assert s.key_id(read_key_file(k)) == kid
    with pytest.raises(Exception, match="never overwritten"):
        write_new_key(k)
    k.chmod(0o640)
    with pytest.raises(Exception, match="chmod 600"):
        read_key_file(k)
    k.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(k)
    with pytest.raises(Exception, match="cannot open"):
        read_key_file(link)
    (tmp_path / "bad").write_text("not hex\n")
    (tmp_path / "bad").chmod(0o600)
    with pytest.raises(Exception, match="64 hex digits"):
        read_key_file(tmp_path / "bad")


def test_the_systemd_credential_wins_and_no_key_at_all_is_refused(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "sidecar-store-key").write_text(KEY.hex())
    k = tmp_path / "k"
    write_new_key(k)
    ring = load_keyring(True, k, None, "", {"CREDENTIALS_DIRECTORY": str(creds)})
    assert ring is not None and ring.current == KEY
    env_ring = load_keyring(True, None, None, KEY.hex(), {})
    assert env_ring is not None and env_ring.current == KEY
    assert load_keyring(False, None, None, "", {}) is None
    with pytest.raises(Exception, match="no key is configured"):
        load_keyring(True, None, None, "", {})


def test_a_delta_rebuilds_from_a_sealed_base_into_a_sealed_target(tmp_path: Path) -> None:
    old = write_tiny_llama(tmp_path / "old.gguf", seed=1)
    new = write_tiny_llama(tmp_path / "new.gguf", seed=1, name="tiny2")
    made = delta.make_delta(old, new, tmp_path / "d.delta")
    store = ModelStore(tmp_path / "store", Keyring(KEY), encrypt=True)
    base = store.add(old, "m")
    with (tmp_path / "d.delta").open("rb") as src, (tmp_path / "s.delta").open("wb") as dst:
        s.seal_stream(src, dst, KEY)  # as an update download keeps it
    info = delta.read_delta_info(tmp_path / "s.delta", store.open_plain)
    assert info == delta.read_delta_info(tmp_path / "d.delta")
    out = tmp_path / "rebuilt.partial"
    got = delta.apply_delta(
        store.blob(base),
        tmp_path / "s.delta",
        out,
        read_old=store.open_plain,
        read_delta=store.open_plain,
        write_out=store.open_output,
    )
    assert got == made.target_sha256
    assert out.read_bytes()[:8] == s.MAGIC  # sealed on the way: never plaintext on disk
    assert store.add(out, "m", expect_sha256=got) == got
    assert store.blob(got).read_bytes()[:8] == s.MAGIC
    with store.open_plain(store.blob(got)) as f:
        assert f.read() == new.read_bytes()


def test_quarantine_of_a_plaintext_file_on_an_encrypted_store_seals_it(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", Keyring(KEY), encrypt=True)
    dropped = write_tiny_llama(tmp_path / "drop.gguf", seed=3)
    plain = dropped.read_bytes()
    where = store.quarantine(dropped, "refused")
    assert not dropped.exists()
    assert where.read_bytes()[:8] == s.MAGIC
    with store.open_plain(where) as f:
        assert f.read() == plain


def test_models_keygen_writes_a_private_key_and_refuses_to_overwrite(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from sidecar.cli.commands import main

    out = CliRunner().invoke(main, ["models", "keygen", "-o", str(tmp_path / "k")])
    assert out.exit_code == 0, out.output
    kid = s.key_id(read_key_file(tmp_path / "k"))
    assert f"wrote key {kid}" in out.output
    again = CliRunner().invoke(main, ["models", "keygen", "-o", str(tmp_path / "k")])
    assert again.exit_code != 0 and "never overwritten" in again.output
    assert s.key_id(read_key_file(tmp_path / "k")) == kid


def test_rekey_without_a_configured_key_says_how_to_give_one(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from sidecar.cli.commands import main

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[store]\npath = "{tmp_path / "store"}"\n')
    out = CliRunner().invoke(main, ["--config", str(cfg), "models", "rekey"], env={})
    assert out.exit_code == 2, out.output
    assert "no key is configured" in out.output


@pytest.mark.parametrize("total", [0, 999, 1000, 3000, 4321])
def test_a_sealed_download_resumes_after_a_cut_at_any_point(tmp_path: Path, total: int) -> None:
    data = os.urandom(total)
    path = tmp_path / "dl.partial"
    r = s.Resumable(KEY, total, chunk=1000)
    for cut in sorted({0, total // 3, total // 2 + 7, total - 1} - {-1}):
        start = r.have(path)
        assert start <= cut or start == total
        assert start % 1000 == 0 or start == total
        if start < total:
            with r.writer(path, start) as w:
                w.write(data[start : max(cut, start)])  # then the connection drops
    start = r.have(path)
    with r.writer(path, start) as w:
        w.write(data[start:])
    assert (
        r.have(path)
        == total
        == path.stat().st_size - s.HEADER_SIZE - s.TAG * max(1, -(-total // 1000))
    )
    assert read_all(path) == data


def test_without_memfd_an_encrypted_store_is_refused_never_a_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sidecar.domain.errors import FailedPrecondition
    from sidecar.store import images

    monkeypatch.delattr(os, "memfd_create")
    assert "memfd_create" in (images.supported() or "")
    with pytest.raises(FailedPrecondition, match="without writing them to disk"):
        ModelStore(tmp_path / "store", Keyring(KEY), encrypt=True)
    plain = ModelStore(tmp_path / "plain", Keyring(KEY))  # reading only: no memfd needed
    assert plain.worker_fd(plain.blob("0" * 64)) is None


def test_a_keyring_repr_names_key_ids_never_the_keys() -> None:
    older = bytes(range(32, 64))
    shown = repr(Keyring(KEY, (older,))) + str(Keyring(KEY, (older,)))
    assert s.key_id(KEY) in shown and s.key_id(older) in shown
    for k in (KEY, older):
        assert k.hex() not in shown and repr(k) not in shown and repr(k)[2:-1] not in shown


def test_a_download_torn_inside_a_chunk_restarts_under_a_fresh_nonce_prefix(
    tmp_path: Path,
) -> None:
    data = os.urandom(3500)
    path = tmp_path / "dl.partial"
    r = s.Resumable(KEY, len(data), chunk=1000)
    with r.writer(path, 0) as w:
        w.write(data[:2000])  # two whole chunks sealed
    before = path.read_bytes()
    with path.open("ab") as f:  # a crash inside the third chunk's write
        f.write(os.urandom(300))
    assert r.have(path) == 0 and not path.exists()  # the third nonce is never used again
    with r.writer(path, 0) as w:
        w.write(data)
    after = path.read_bytes()
    assert after[22:30] != before[22:30]  # a new nonce prefix for every chunk
    assert read_all(path) == data
    # a cut at a chunk boundary (a dropped connection) still resumes where it was
    with r.writer(path, 0) as w:
        w.write(data[:1000])
    assert r.have(path) == 1000


def test_a_blob_removed_while_it_is_resealed_is_not_brought_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sidecar.store import rekey

    src = write_tiny_llama(tmp_path / "a.gguf", seed=18_404)
    old = ModelStore(tmp_path / "store", Keyring(KEY), encrypt=True)
    sha = old.add(src, "m")
    blob = old.blob(sha)
    new_key = bytes(range(64, 96))
    store = ModelStore(tmp_path / "store", Keyring(new_key, (KEY,)), encrypt=True)
    seal_into = store._seal_into

    def gc_meanwhile(a: Path, b: Path, mode: int = 0o600) -> str:
        got = seal_into(a, b, mode)
        blob.unlink()  # what the daemon's gc does between the read and the rename
        return got

    monkeypatch.setattr(store, "_seal_into", gc_meanwhile)
    report = rekey.rekey(store)
    assert report.resealed == [] and report.failed == [], report
    assert not blob.exists()
    assert sorted(p.name for p in store.blobs.iterdir()) == []  # no partial left either


def test_show_reads_a_sealed_blob_with_the_configured_key_and_names_it_without(
    tmp_path: Path,
) -> None:
    import hashlib
    import json

    from click.testing import CliRunner

    from sidecar.cli.commands import main

    model = write_tiny_llama(tmp_path / "a.gguf", seed=18_405)
    write_new_key(tmp_path / "k")
    key = read_key_file(tmp_path / "k")
    store = ModelStore(tmp_path / "store", Keyring(key), encrypt=True)
    blob = store.blob(store.add(model, "m"))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[store]\npath = "{tmp_path / "store"}"\nkey_file = "{tmp_path / "k"}"\n')
    out = CliRunner().invoke(main, ["--config", str(cfg), "show", str(blob), "--json"], env={})
    assert out.exit_code == 0, out.output
    d = json.loads(out.stdout)
    assert d["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()  # the plaintext's
    assert d["architecture"] == "llama" and d["size"] == model.stat().st_size
    cfg.write_text(f'[store]\npath = "{tmp_path / "store"}"\n')
    out = CliRunner().invoke(main, ["--config", str(cfg), "show", str(blob)], env={})
    assert out.exit_code != 0 and s.key_id(key) in out.output, out.output
