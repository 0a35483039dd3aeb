"""The on-disk cache of example vectors and fitted classifier parameters, capped in size.

A set's vectors depend on its examples and the model version only (`<key>.npy`); its
fitted parameters also on whether label scoring takes part and on how fitting works
(`<key>.<PARAMS_VERSION>.npz`). A damaged file is recomputed, never trusted. Past
`max_bytes` the least recently used files go first; the files of config tasks are never
evicted. Every method blocks on the disk: call them off the event loop.

A build that is still embedding writes what it has so far (`<key>.partial.npz`: the rows
and which of them are done), so a daemon stopped or killed mid-build continues where it
stopped when it next builds the same set with the same model version. Embedding a text
gives the same vector whatever it was batched with, so the resumed vectors are exactly
those an uninterrupted build would have made.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sidecar.fewshot.classifier import F32, ExampleClassifier, Params

log = logging.getLogger("sidecar.fewshot")

CACHE_MAX_BYTES = 256 * 1024 * 1024  # vector + parameter files on disk
PARAMS_VERSION = "p3"  # bump when fitting changes: cached parameters are then refitted
LABEL_SCORING = "+ls"  # key suffix of sets fitted with label scoring; same vectors


class VectorCache:
    def __init__(self, folder: Path, max_bytes: int = CACHE_MAX_BYTES) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self._keep: set[str] = set()  # keys of config tasks: never evicted

    def keep(self, key: str) -> None:
        self._keep.add(key)

    def load_vectors(self, key: str, n: int) -> F32 | None:
        path = self._vectors_file(key)
        try:
            v = np.load(path, allow_pickle=False)
            os.utime(path)  # recently used: the last the cap evicts
        except (OSError, ValueError):
            return None
        if v.ndim != 2 or v.shape[0] != n:
            return None
        out: F32 = v.astype(np.float32)
        return out

    def save_vectors(self, key: str, vectors: F32) -> None:
        path = self._vectors_file(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, vectors, allow_pickle=False)
        tmp.replace(path)
        self._prune(path)

    def load_partial(self, key: str, n: int) -> tuple[F32, npt.NDArray[np.bool_]] | None:
        """The vectors a stopped build of this set had made, and which rows they are."""
        path = self._partial_file(key)
        try:
            with np.load(path, allow_pickle=False) as z:
                vectors, have = z["vectors"].astype(np.float32), z["have"].astype(bool)
        except (OSError, ValueError, KeyError, EOFError):
            return None
        if vectors.ndim != 2 or vectors.shape[0] != n or have.shape != (n,):
            return None
        return vectors, have

    def save_partial(self, key: str, vectors: F32, have: npt.NDArray[np.bool_]) -> None:
        path = self._partial_file(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        with tmp.open("wb") as f:
            np.savez(f, vectors=vectors, have=have)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        self._prune(path)

    def drop_partial(self, key: str) -> None:
        with contextlib.suppress(OSError):
            self._partial_file(key).unlink()

    def load_params(self, key: str, clf: ExampleClassifier) -> bool:
        """Restore fitted parameters and probe; False (refit) if missing or damaged."""
        path = self._params_file(key)
        try:
            with np.load(path, allow_pickle=False) as z:
                raw = json.loads(str(z["params"]))
                params = Params(**{**raw, "weights": tuple(raw["weights"])})
                probe = (z["w"].astype(np.float32), z["b"].astype(np.float32))
        except (OSError, ValueError, TypeError, KeyError, EOFError):
            return False
        if probe[0].shape != (clf.vectors.shape[1], clf.n_labels):
            return False
        clf.params, clf.probe = params, probe
        with contextlib.suppress(OSError):
            os.utime(path)
        return True

    def save_params(self, key: str, clf: ExampleClassifier) -> None:
        path = self._params_file(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        w, b = clf.probe if clf.probe is not None else (np.zeros((0, 0)), np.zeros(0))
        tmp = path.with_suffix(".tmp.npz")
        with tmp.open("wb") as f:
            np.savez(f, params=np.array(json.dumps(asdict(clf.params))), w=w, b=b)
        tmp.replace(path)
        self._prune(path)

    def _vectors_file(self, key: str) -> Path:
        return self.folder / f"{key.removesuffix(LABEL_SCORING)}.npy"

    def _partial_file(self, key: str) -> Path:
        return self.folder / f"{key.removesuffix(LABEL_SCORING)}.partial.npz"

    def _params_file(self, key: str) -> Path:
        return self.folder / f"{key}.{PARAMS_VERSION}.npz"

    def _prune(self, just_written: Path) -> None:
        """Remove the least recently used files until the folder fits in max_bytes."""
        keep = {just_written.name}
        for key in set(self._keep):  # a copy: the event loop may add keys meanwhile
            keep |= {
                self._vectors_file(key).name,
                self._params_file(key).name,
                self._partial_file(key).name,
            }
        entries = []
        for p in self.folder.iterdir():
            try:
                st = p.stat()
            except OSError:
                continue  # removed meanwhile
            entries.append((st.st_mtime_ns, st.st_size, p))
        total = sum(nbytes for _, nbytes, _ in entries)
        for _, nbytes, p in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if p.name in keep:
                continue
            try:
                p.unlink()
            except OSError:
                continue
            total -= nbytes
            log.info(
                "vector cache over %d MiB: removed %s", self.max_bytes // (1024 * 1024), p.name
            )
