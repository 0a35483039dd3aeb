"""Attacks on the store, the GGUF checker, model names, logs and the socket lock (issue 12)."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sidecar import fileio
from sidecar.domain.errors import InvalidRequest
from sidecar.domain.names import check_name, name_problem, shown
from sidecar.gguf_check import MAX_STRING_ARRAY, GGUFError, check
from sidecar.logs import JsonFormatter, TextFormatter
from sidecar.socket_claim import SocketClaim, SocketUnsafe
from sidecar.store import BlobChanged, ModelStore, startup_blob

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_gguf import write_tiny_llama

NOBODY = 65534


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_tiny_llama(tmp_path / "user.gguf", seed=3)


# ---------------------------------------------------------------- GGUF bytes


def gguf_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def kv(key: str, kind: int, payload: bytes) -> bytes:
    return gguf_str(key) + struct.pack("<I", kind) + payload


def with_kv(src: Path, dst: Path, extra: bytes) -> Path:
    """`src` with one more metadata entry (right after the header)."""
    data = src.read_bytes()
    (n_kv,) = struct.unpack_from("<Q", data, 16)
    dst.write_bytes(data[:16] + struct.pack("<Q", n_kv + 1) + extra + data[24:])
    return dst


ALIGNMENTS = {
    "string": (8, gguf_str("x32")),
    "inf": (6, struct.pack("<f", math.inf)),
    "int_list": (9, struct.pack("<IQ", 4, 1) + struct.pack("<I", 32)),
    "string_list": (9, struct.pack("<IQ", 8, 1) + gguf_str("32")),
    "uint64": (10, struct.pack("<Q", 32)),
    "zero": (4, struct.pack("<I", 0)),
}


def bad_alignment(src: Path, dst: Path, how: str) -> Path:
    kind, payload = ALIGNMENTS[how]
    return with_kv(src, dst, kv("general.alignment", kind, payload))


@pytest.mark.parametrize("how", sorted(ALIGNMENTS))
def test_an_alignment_that_is_not_a_power_of_two_uint32_is_refused_with_a_reason(
    model: Path, tmp_path: Path, how: str
) -> None:
    bad = bad_alignment(model, tmp_path / f"{how}.gguf", how)
    with pytest.raises(GGUFError, match=r"general\.alignment"):
        check(bad)
    store = ModelStore(tmp_path / "store")
    with pytest.raises(InvalidRequest, match=r"general\.alignment"):
        store.add(bad, "m")
    assert list(store.blobs.iterdir()) == []  # never copied in


def many_strings(path: Path, arrays: int, per_array: int) -> Path:
    """`arrays` string arrays of `per_array` distinct 4-character strings each."""
    alphabet = np.frombuffer(
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+-", dtype=np.uint8
    )
    with path.open("wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, arrays))
        for a in range(arrays):
            ids = np.arange(a * per_array, (a + 1) * per_array, dtype=np.uint64)
            items = np.zeros(per_array, dtype=[("n", "<u8"), ("s", "u1", 4)])
            items["n"] = 4
            for k in range(4):
                items["s"][:, k] = alphabet[(ids >> np.uint64(6 * k)) & np.uint64(63)]
            f.write(kv(f"junk.{a}", 9, struct.pack("<IQ", 8, per_array)))
            f.write(items.tobytes())
    return path


def test_an_absurd_string_array_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "absurd.gguf"
    path.write_bytes(
        b"GGUF"
        + struct.pack("<IQQ", 3, 0, 1)
        + kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, MAX_STRING_ARRAY + 1))
        + b"\0" * 64
    )
    with pytest.raises(GGUFError, match=f"limit {MAX_STRING_ARRAY}"):
        check(path)


def test_millions_of_metadata_strings_cost_time_not_memory(tmp_path: Path) -> None:
    # The file held 4M short strings in 40 MB; here 2M distinct ones in 24 MB (two
    # arrays, each under the count limit). Measured in a fresh process: peak RSS growth
    # while checking it (holding them as str objects grows it by ~150 MiB).
    path = many_strings(tmp_path / "strings.gguf", arrays=2, per_array=1_000_000)
    probe = textwrap.dedent(
        f"""
        import resource, sys, time
        from pathlib import Path
        from sidecar.gguf_check import check
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.monotonic()
        info = check(Path({str(path)!r}))
        seconds = time.monotonic() - t0
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(grown // 1024, round(seconds, 2), len(info.metadata))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    grown_mib, seconds, keys = out.stdout.split()
    assert int(keys) == 2
    assert int(grown_mib) < 32, f"RSS grew {grown_mib} MiB checking a 24 MB file"
    assert float(seconds) < 20


# ---------------------------------------------------------------- the store owns its bytes


def test_import_copies_and_leaves_the_users_file_alone(model: Path, tmp_path: Path) -> None:
    model.chmod(0o644)
    before = model.stat()
    store = ModelStore(tmp_path / "store")
    sha = store.add(model, "m")
    blob = store.blob(sha)
    after = model.stat()
    assert stat.S_IMODE(after.st_mode) == 0o644  # never chmodded
    assert after.st_nlink == 1 and blob.stat().st_ino != after.st_ino  # never hardlinked
    assert (after.st_mtime_ns, after.st_ctime_ns) == (before.st_mtime_ns, before.st_ctime_ns)
    original = blob.read_bytes()
    with model.open("r+b") as f:  # the user rewrites their file in place
        f.seek(4096)
        f.write(b"\xaa" * 4096)
    assert blob.read_bytes() == original
    store.verify(sha)  # untouched by the user's write


def test_a_refused_import_leaves_the_users_file_alone(model: Path, tmp_path: Path) -> None:
    model.chmod(0o644)
    store = ModelStore(tmp_path / "store")
    with pytest.raises(InvalidRequest, match="expected"):
        store.add(model, "m", expect_sha256="0" * 64)
    assert stat.S_IMODE(model.stat().st_mode) == 0o644 and model.stat().st_nlink == 1
    assert list(store.blobs.iterdir()) == []


def test_reflink_is_tried_first_and_a_copy_follows(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def ioctl(fd: int, request: int, arg: int) -> int:
        calls.append(request)
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(fileio.fcntl, "ioctl", ioctl)
    fileio.clone_or_copy(model, tmp_path / "copy.gguf")
    assert calls == [fileio.FICLONE]
    assert (tmp_path / "copy.gguf").read_bytes() == model.read_bytes()
    assert stat.S_IMODE((tmp_path / "copy.gguf").stat().st_mode) == 0o600


def count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    hashed: list[Path] = []
    real = ModelStore.sha256

    def spy(self: ModelStore, path: Path) -> str:
        hashed.append(path)
        return real(self, path)

    monkeypatch.setattr(ModelStore, "sha256", spy)
    return hashed


def test_verify_is_one_stat_when_untouched_and_a_hash_when_not(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(tmp_path / "store")
    sha = store.add(model, "m")
    store.add(write_tiny_llama(tmp_path / "other.gguf", seed=4), "m")
    hashed = count_hashes(monkeypatch)
    store.verify(sha)
    assert hashed == []
    blob = store.blob(sha)
    os.utime(blob)  # touched but not changed: rehashed once, then cheap again
    store.verify(sha)
    store.verify(sha)
    assert hashed == [blob]
    blob.chmod(0o644)
    with blob.open("r+b") as f:  # someone with write access rewrites a blob
        f.seek(2000)
        f.write(b"\x55" * 64)
    with pytest.raises(BlobChanged, match="changed on disk"):
        store.verify(sha)
    assert not blob.exists() and sha not in store.versions("m")
    assert any(store.quarantine_dir.glob("*.reason"))
    assert len(store.all_versions()) == 1  # listing still works


def test_a_blob_sharing_its_inode_is_rehashed_and_given_its_own(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A store written before imports copied: the blob is a hardlink to the user's file.
    store = ModelStore(tmp_path / "store")
    sha = store.add(model, "m")
    user = tmp_path / "linked.gguf"
    os.link(store.blob(sha), user)
    hashed = count_hashes(monkeypatch)
    store.verify(sha)
    assert hashed == [store.blob(sha)]
    assert store.blob(sha).stat().st_nlink == 1 and user.stat().st_nlink == 1
    user.chmod(0o644)
    user.write_bytes(b"overwritten")
    store.verify(sha)  # the blob kept its bytes


def test_a_restart_does_not_serve_a_changed_blob(model: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    first = startup_blob(store, "m", model)
    sha = first.stem
    first.chmod(0o644)
    first.write_bytes(model.read_bytes()[:-100] + b"\0" * 100)  # same size, other bytes
    again = startup_blob(ModelStore(tmp_path / "store"), "m", model)
    assert again.read_bytes() == model.read_bytes()  # imported again from the config's file
    assert again.stem == sha


# ---------------------------------------------------------------- names and paths

BAD_NAMES = ["../../../victim", "a/b", ".hidden", "..", "", "x" * 65, "a\nb", "a b", "é"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_by_every_store_path(name: str, model: Path, tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "store"
    store = ModelStore(root)
    sha = store.add(model, "ok")
    store.activate("ok", sha)
    # What `../../../victim` reaches from <root>/models: a directory beside the store.
    victim = tmp_path / "a" / "victim" / "versions"
    victim.mkdir(parents=True)
    (victim / sha).write_text("not the store's")
    for call in (
        lambda: store.versions(name),
        lambda: store.resolve(name, sha[:12]),
        lambda: store.remove(name, sha, set()),
        lambda: store.activate(name, sha),
        lambda: store.add(model, name),
        lambda: store.active(name),
        lambda: startup_blob(store, name, model),
    ):
        with pytest.raises(InvalidRequest):
            call()
    assert (victim / sha).read_text() == "not the store's"
    assert store.active("ok") == sha


def test_a_model_directory_that_links_outside_the_store_is_refused(
    model: Path, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path / "store")
    outside = tmp_path / "outside"
    (outside / "versions").mkdir(parents=True)
    (outside / "versions" / ("a" * 64)).touch()
    (store.models / "evil").symlink_to(outside)
    with pytest.raises(InvalidRequest, match="outside the store"):
        store.remove("evil", "a" * 64, set())
    assert (outside / "versions" / ("a" * 64)).exists()
    assert "evil" not in store.names()


def test_versions_must_be_hex(model: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    store.add(model, "m")
    for version in ("", "../x", "*", "g" * 12):
        with pytest.raises(InvalidRequest, match="bad version"):
            store.resolve("m", version)


def test_the_name_rule() -> None:
    for good in ("default", "chat", "qwen2.5-0.5b_q4", "A" * 64, "-x", "_"):
        assert check_name(good) == good and name_problem(good) is None
    for bad in BAD_NAMES:
        assert name_problem(bad)
    assert len(shown("y" * 1_000_000)) < 80
    assert "\n" not in shown("a\nb")


# ---------------------------------------------------------------- logs


def one_record(formatter: logging.Formatter, msg: str, *args: object, **extra: object) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    logger = logging.getLogger("sidecar.test.logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    try:
        logger.warning(msg, *args, extra=extra)
    finally:
        logger.handlers[:] = []
    return out.getvalue()


def test_a_name_cannot_forge_a_log_line_or_flood_it() -> None:
    forged = "x\n2030-01-01 00:00:00,000 INFO sidecar.request: admin logged in\r"
    text = one_record(
        TextFormatter("%(levelname)s %(message)s"), "model=%s status=NOT_FOUND", forged
    )
    assert text.count("\n") == 1 and "\\n2030" in text and "\r" not in text
    huge = one_record(TextFormatter("%(message)s"), "model=%s", "y" * 1_000_000)
    assert len(huge) < 3000 and "more characters" in huge
    line = one_record(JsonFormatter(), "model=%s", "y" * 1_000_000, request={"model": "y" * 10**6})
    assert len(line) < 6000
    assert json.loads(line)["model"].startswith("yyy")


def test_tracebacks_keep_their_lines() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(TextFormatter("%(message)s"))
    logger = logging.getLogger("sidecar.test.tb")
    logger.handlers[:] = [handler]
    logger.propagate = False
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    finally:
        logger.handlers[:] = []
    assert "Traceback (most recent call last):\n" in out.getvalue()


# ---------------------------------------------------------------- quarantine


def test_quarantine_is_private_and_named_files_are_never_copied(
    model: Path, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path / "store")
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$secret\n")
    secret.chmod(0o600)
    where = store.quarantine(secret, "not a GGUF file", move=False)
    assert where.name.endswith(".reason") and "not copied" in where.read_text()
    assert [p for p in store.quarantine_dir.iterdir() if "secret" in p.read_text()] == []
    assert stat.S_IMODE(where.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.quarantine_dir.stat().st_mode) == 0o700
    dropped = tmp_path / "dropped.gguf"
    dropped.write_bytes(b"nope")
    dropped.chmod(0o644)
    moved = store.quarantine(dropped, "refused")
    assert not dropped.exists() and stat.S_IMODE(moved.stat().st_mode) == 0o600
    sha = store.add(model, "m")
    copied = store.quarantine(store.blob(sha), "canary failed", move=False)  # ours: copied
    assert copied.read_bytes() == model.read_bytes()
    assert stat.S_IMODE(copied.stat().st_mode) == 0o600


# ---------------------------------------------------------------- the socket lock


@pytest.fixture
def shared_dir(short_dir: Path) -> Path:
    d = short_dir / "tmp"
    d.mkdir()
    d.chmod(0o1777)  # like /tmp
    return d


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="simulates another user with chown")


@needs_root
def test_a_lock_symlink_planted_by_another_user_is_refused(
    shared_dir: Path, short_dir: Path
) -> None:
    victim = short_dir / "victim"
    victim.write_text("precious\n")
    link = shared_dir / "s.sock.lock"
    link.symlink_to(victim)
    os.lchown(link, NOBODY, NOBODY)
    with pytest.raises(SocketUnsafe, match="uid 65534"):
        SocketClaim(shared_dir / "s.sock").acquire()
    assert victim.read_text() == "precious\n"


def test_a_lock_symlink_is_never_followed(short_dir: Path) -> None:
    victim = short_dir / "victim"
    victim.write_text("precious\n")
    d = short_dir / "run"
    d.mkdir(mode=0o700)
    (d / "s.sock.lock").symlink_to(victim)
    with pytest.raises(SocketUnsafe, match="symbolic link"):
        SocketClaim(d / "s.sock").acquire()
    assert victim.read_text() == "precious\n"


@needs_root
def test_directories_other_users_control_are_refused(short_dir: Path) -> None:
    open_dir = short_dir / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(SocketUnsafe, match="not sticky"):
        SocketClaim(open_dir / "s.sock").acquire()
    theirs = short_dir / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(SocketUnsafe, match="belongs to uid 65534"):
        SocketClaim(theirs / "s.sock").acquire()
    assert not (open_dir / "s.sock.lock").exists() and not (theirs / "s.sock.lock").exists()


def test_a_sticky_shared_directory_works_with_entries_of_our_own(shared_dir: Path) -> None:
    claim = SocketClaim(shared_dir / "s.sock")
    claim.acquire()
    try:
        lock = shared_dir / "s.sock.lock"
        assert lock.read_text() == f"{os.getpid()}\n"
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600
        assert os.get_inheritable(claim._fd) is False  # type: ignore[arg-type]
        assert fcntl_cloexec(claim._fd)  # type: ignore[arg-type]
    finally:
        claim.release()
    again = SocketClaim(shared_dir / "s.sock")  # our own leftover lock file is fine
    again.acquire()
    again.release()


def fcntl_cloexec(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


@pytest.mark.parametrize(
    "args",
    [
        ["models", "add", "{model}", "--name", "a\nb"],
        ["models", "add", "{model}", "--name", "x" * 65],
        ["models", "remove", "../../victim@abc123"],
        ["swap", "bad\nname@abc123"],
        ["swap", "../x={model}"],
    ],
)
def test_the_cli_refuses_bad_names_before_it_connects(
    args: list[str], model: Path, short_dir: Path
) -> None:
    from click.testing import CliRunner

    from sidecar.cli.commands import main

    argv = [a.replace("{model}", str(model)) for a in args]
    out = CliRunner().invoke(main, [*argv, "--socket", str(short_dir / "none.sock")])
    assert out.exit_code == 2, out.output
    assert "bad model name" in out.output and "cannot connect" not in out.output.lower()


@pytest.mark.parametrize("name", ["../x", "a b", "x" * 65])
def test_config_refuses_model_names_the_store_cannot_hold(
    name: str, model: Path, tmp_path: Path
) -> None:
    from sidecar.config import Overrides, load
    from sidecar.domain.errors import ConfigError

    toml = tmp_path / "c.toml"
    toml.write_text(f'[models."{name}"]\npath = "{model}"\n')
    with pytest.raises(ConfigError, match="bad model name"):
        load(Overrides(config=toml), env={})
    toml.write_text(f'default_model = "{name}"\n[models.ok]\npath = "{model}"\n')
    with pytest.raises(ConfigError, match="bad model name"):
        load(Overrides(config=toml), env={})


async def test_a_drop_folder_that_cannot_be_watched_says_why(tmp_path: Path) -> None:
    from sidecar.dropwatch import DropWatcher

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    watcher = DropWatcher(object(), blocker / "drop", auto_swap=True)  # type: ignore[arg-type]
    await watcher.start()  # the daemon goes on serving without it
    assert watcher.health.startswith(f"stopped: cannot watch {blocker / 'drop'}")
    await watcher.close()


def test_a_directory_under_one_another_user_controls_is_refused(short_dir: Path) -> None:
    # Ours and private, but its parent is theirs: they could rename ours away and put a
    # link to any directory in its place between our check and our use.
    theirs = short_dir / "theirs"
    theirs.mkdir(mode=0o755)
    mine = theirs / "mine"
    mine.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(SocketUnsafe, match="belongs to uid 65534"):
        SocketClaim(mine / "s.sock").acquire()
    assert not (mine / "s.sock.lock").exists()
