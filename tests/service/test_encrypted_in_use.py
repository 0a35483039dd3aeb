"""On an encrypted store the workers map a memfd, not the blob: the store still sees which
versions they map (`/memfd:sidecar-<sha256>` in /proc/PID/maps), so gc keeps them, and
the daemon closes the decrypted copies no pool needs after a swap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import make_config, start_app
from tiny_gguf import write_tiny_llama

from sidecar.fileio import sha256_file

pytestmark = pytest.mark.asyncio


async def test_workers_on_memfds_count_as_in_use_and_old_copies_are_closed(
    short_dir: Path, tmp_path: Path
) -> None:
    a = write_tiny_llama(tmp_path / "a.gguf", seed=18_301, n_ctx=4096)
    b = write_tiny_llama(tmp_path / "b.gguf", seed=18_302, n_ctx=4096)
    env = {"SIDECAR_STORE_ENCRYPTION": "on", "SIDECAR_STORE_KEY": "7c" * 32}
    app = await start_app(make_config(short_dir, a, env=env, workers=2), slot_kind="process")
    try:
        sha_a, sha_b = sha256_file(a), sha256_file(b)
        in_use = app.local.in_use()
        assert set(in_use) == {sha_a} and "worker pid" in in_use[sha_a], in_use
        assert app.store.images.held() == {sha_a}
        pids = [s.info.pid for s in app.local.pools["default"].workers()]
        assert len(pids) == 2 and all(pids)
        for pid in (os.getpid(), *pids):  # the decrypted copy is never inherited
            assert _memfd_flags(pid), f"pid {pid} holds no memfd"
            assert all(f & os.O_CLOEXEC for f in _memfd_flags(pid)), (pid, _memfd_flags(pid))
            assert _no_core_dump(pid), f"pid {pid} may dump the decrypted model to disk"
        await app.local.swap("", path=b)
        app.local.keep_images()
        assert app.store.images.held() == {sha_b}  # a's copy closed: its workers are gone
        assert set(app.local.in_use()) == {sha_b}
        # gc keeps what is mapped and pointed at; a version nothing needs goes.
        c = write_tiny_llama(tmp_path / "c.gguf", seed=18_303, n_ctx=4096)
        await app.local.swap("", path=c)
        removed = app.store.gc(app.local.in_use())
        assert removed == [f"default@{sha_a[:12]}"], removed
        assert app.store.blob(sha256_file(c)).is_file() and app.store.blob(sha_b).is_file()
    finally:
        await app.stop(grace=0)


def _memfd_flags(pid: int) -> list[int]:
    """The open flags of each decrypted copy (memfd) process `pid` holds."""
    flags = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:sidecar-"):
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except FileNotFoundError:
            continue
        flags.append(int(info.split("flags:")[1].split()[0], 8))
    return flags


def _no_core_dump(pid: int) -> bool:
    """Neither a core file (RLIMIT_CORE 0) nor memory in a handler's dump (filter 0)."""
    limits = Path(f"/proc/{pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    filt = int(Path(f"/proc/{pid}/coredump_filter").read_text(), 16)
    return core.split()[4:6] == ["0", "0"] and filt == 0
