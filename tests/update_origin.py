"""An update origin folder written by the real publisher code, for tests of updates.

`make_origin` signs v1 (the tiny model) and v2 (the same weights, another chat template)
with a fresh key and lists a v1 -> v2 delta; `start` serves v1 from a daemon that trusts
that key and fetches from the folder (or from `url`, e.g. a TrickleOrigin over it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tiny_gguf import write_tiny_llama

from sidecar.fileio import sha256_file
from sidecar.update.delta import make_delta
from sidecar.update.manifest import (
    Manifest,
    generate_keypair,
    load_private_key,
    parse_public_key,
    publish,
    sign,
    verify,
)
from sidecar.v1 import inference_pb2 as pb


@dataclass
class Origin:
    root: Path
    key: Path
    public: str
    v1: Path
    v2: Path

    @property
    def manifest_path(self) -> Path:
        return self.root / "default.manifest.json"

    def manifest(self) -> Manifest:
        return verify(self.manifest_path.read_bytes(), parse_public_key(self.public),
                      name="default", installed_version=None)  # fmt: skip

    def make(self, old: Path, new: Path) -> Path:
        """Write the old -> new delta under deltas/, named by the two hashes."""
        info = make_delta(old, new, self.root / "deltas" / ".tmp")
        out = self.root / "deltas" / f"{info.base_sha256[:12]}-{info.target_sha256[:12]}.delta"
        (self.root / "deltas" / ".tmp").replace(out)
        return out

    def publish(self, version: int, file: Path, **kw: Any) -> None:
        publish(self.root, name=kw.pop("name", "default"), version=version, key_path=self.key,
                file=file, **kw)  # fmt: skip

    def list_delta(self, data: bytes) -> str:
        """Put `data` in place of the v1 -> v2 delta and sign the manifest that lists it
        (what a stolen key, or a publisher bug, can do). Returns the delta's sha256."""
        path = self.root / "deltas" / "hostile.delta"
        path.write_bytes(data)
        good = self.manifest()
        entry = replace(good.deltas[0], path="deltas/hostile.delta",
                        sha256=sha256_file(path), size=len(data))  # fmt: skip
        self.manifest_path.write_bytes(
            sign(replace(good, deltas=(entry,)), load_private_key(self.key))
        )
        return entry.sha256


def make_origin(tmp_path: Path, tiny_model: Path) -> Origin:
    """An origin in tmp_path/origin: v1 = tiny_model, v2 = a new chat template, a delta."""
    root = tmp_path / "origin"
    (root / "deltas").mkdir(parents=True)
    private, public = generate_keypair()
    key = tmp_path / "signing.pem"
    key.write_bytes(private)
    v2 = write_tiny_llama(
        tmp_path / "v2.gguf", seed=1, n_ctx=4096, chat_template="{{ messages }} v2"
    )
    o = Origin(root, key, public, tiny_model, v2)
    o.publish(1, tiny_model)
    o.make(tiny_model, v2)
    o.publish(2, v2)
    return o


async def start(serve, origin: Origin, url: str | None = None, **update: object):  # type: ignore[no-untyped-def]
    """A daemon (process workers) serving origin.v1, updating from `url` or the folder;
    `update` sets keys of its [update] section."""
    keys = {"update_origin": url or str(origin.root), "update_key": origin.public}
    return await serve(origin.v1, slot_kind="process", workers=1, model_keys=keys,
                       update=update or None)  # fmt: skip


async def apply(client) -> list[pb.UpdateProgress]:  # type: ignore[no-untyped-def]
    """Every progress message of one ApplyUpdate, the outcome last."""
    return [p async for p in client.admin.ApplyUpdate(pb.UpdateRequest())]


async def wait_for(what: Callable[[], Awaitable[Any]], timeout: float = 30) -> Any:
    """Poll `what` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await what()
        if got:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout}s")
