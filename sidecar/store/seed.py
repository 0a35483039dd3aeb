"""Which file serves a model at start: the store's active version, or the configured file."""

from __future__ import annotations

import logging
from pathlib import Path

from sidecar.domain.errors import FailedPrecondition
from sidecar.fileio import write_atomic
from sidecar.store.model_store import BlobChanged, ModelStore

log = logging.getLogger("sidecar.store")


def startup_blob(store: ModelStore, name: str, configured: Path) -> Path:
    """The file to serve `name` from at start: the store's active version, unless the
    configured path is new or changed since it last seeded the store (then it is imported
    and activated). So swaps survive restarts, and editing the config still wins. A
    configured file that does not exist is an error, never a silent fallback. The active
    blob is verified first; one that changed on disk is set aside and the configured file
    is imported again."""
    seed_file = store._model_dir(name) / "seed"
    try:
        st = configured.stat()
    except FileNotFoundError:
        raise FailedPrecondition(f"model {name!r}: no file at {configured}") from None
    seed = f"{configured.resolve()}\t{st.st_size}\t{st.st_mtime_ns}"
    active = store.active(name)
    old_seed = seed_file.read_text() if seed_file.exists() else None
    if active and seed == old_seed:
        try:
            store.verify(active)
            return store.blob(active)
        except BlobChanged as e:
            log.warning("model %r: %s; importing %s again", name, e.message, configured)
    sha = store.add(configured, name)
    store.activate(name, sha)
    write_atomic(seed_file, seed.encode())
    return store.blob(sha)
