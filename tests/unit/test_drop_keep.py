"""Where the drop folder keeps a taken file with store.drop_remove_plaintext = false: under
`.imported/` or `.refused/` at its place, a free name on a collision, also where the
filesystem has no hard links; and which paths the watcher takes at all."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from sidecar.dropwatch import keep, wanted


@pytest.mark.parametrize("links", [True, False], ids=["links", "no-links"])
def test_a_kept_file_gets_a_free_name_at_its_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, links: bool
) -> None:
    if not links:

        def no_link(_src: object, _dst: object) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    drop = tmp_path / "drop"
    (drop / "m").mkdir(parents=True)
    kept = []
    for i in range(3):
        f = drop / "m" / "x.gguf"
        f.write_bytes(b"GGUF%d" % i)
        kept.append(keep(drop, f, imported=i < 2))
        assert not f.exists()
    assert [p.relative_to(drop).as_posix() for p in kept] == [
        ".imported/m/x.gguf", ".imported/m/x.1.gguf", ".refused/m/x.gguf"]  # fmt: skip
    assert [p.read_bytes() for p in kept] == [b"GGUF0", b"GGUF1", b"GGUF2"]


def test_the_watcher_ignores_dot_folders_inside_the_drop_folder_only(tmp_path: Path) -> None:
    drop = tmp_path / ".config" / "drop"  # a drop folder may itself lie under a dot-folder
    assert wanted(drop / "x.gguf", drop) and wanted(drop / "m" / "x.gguf", drop)
    for ignored in (".imported/x.gguf", ".refused/m/x.gguf", ".x.gguf", "m/.tmp/x.gguf",
                    "x.gguf.partial", "x.bin"):  # fmt: skip
        assert not wanted(drop / ignored, drop), ignored
    assert not wanted(tmp_path / "elsewhere.gguf", drop)
