"""The on-disk cache of example vectors and fitted classifier parameters, capped in size.

A set's vectors depend on its examples and the model version only (`<key>.npy`); its
fitted parameters also on whether label scoring takes part and on how fitting works
(`<key>.<PARAMS_VERSION>.npz`, with the held-out features that calibrate the
out-of-scope signal, `novelty`). A damaged file is recomputed, never trusted. Past
`max_bytes` the least recently used files go first; the files of config tasks are never
evicted. Every method blocks on the disk: call them off the event loop.

A build that is still embedding writes what it has so far (`<key>.partial.npz`: the rows
and which of them are done), so a daemon stopped or killed mid-build continues where it
stopped when it next builds the same set with the same model version. Embedding a text
gives the same vector whatever it was batched with, so the resumed vectors are exactly
those an uninterrupted build would have made.

For the same reason a new set reuses the vectors of texts other cached sets already hold
(same model version): each finished set also writes which texts its rows are
(`<key>.texts`: the model version and a hash per row, an npz file), and `seed` starts a build with
those rows done. Editing a task's CSV then embeds only the rows that changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sidecar.fewshot.classifier import F32, ExampleClassifier, Params
from sidecar.fewshot.novelty import N_FEATURES, Scope

log = logging.getLogger("sidecar.fewshot")

CACHE_MAX_BYTES = 256 * 1024 * 1024  # vector + parameter files on disk
PARAMS_VERSION = "p4"  # bump when fitting changes: cached parameters are then refitted
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

    def save_texts(
        self, key: str, version: str, texts: tuple[str, ...], *, if_missing: bool = False
    ) -> None:
        """Record which texts (by hash) a finished set's rows are, for `seed`."""
        path = self._texts_file(key)
        if if_missing and path.exists():
            return
        tmp = path.with_suffix(".texts-tmp")
        with tmp.open("wb") as f:
            np.savez(f, version=np.array(version), hashes=_hashes(texts))
        tmp.replace(path)
        self._prune(path)

    def seed(
        self, key: str, version: str, texts: tuple[str, ...]
    ) -> tuple[F32, npt.NDArray[np.bool_]] | None:
        """The vectors of `texts` that other cached sets of this model version hold, and
        which rows they are; None when no row is known."""
        want = _hashes(texts)
        row_of: dict[bytes, list[int]] = {}
        for r, h in enumerate(want):
            row_of.setdefault(h.tobytes(), []).append(r)
        vectors: F32 | None = None
        have = np.zeros(len(texts), bool)
        own = self._texts_file(key).name
        for path in sorted(self.folder.glob("*.texts")):
            if path.name == own or have.all():
                continue
            try:
                with np.load(path, allow_pickle=False) as z:
                    if str(z["version"]) != version:
                        continue
                    hashes = z["hashes"]
                theirs = np.load(self.folder / path.name.replace(".texts", ".npy"), mmap_mode="r")
            except (OSError, ValueError, KeyError, EOFError):
                continue
            if theirs.ndim != 2 or theirs.shape[0] != len(hashes):
                continue
            if vectors is None:
                vectors = np.zeros((len(texts), theirs.shape[1]), np.float32)
            elif theirs.shape[1] != vectors.shape[1]:
                continue
            for j, h in enumerate(hashes):
                for r in row_of.get(h.tobytes(), ()):
                    if not have[r]:
                        vectors[r] = theirs[j]
                        have[r] = True
        if vectors is None or not have.any():
            return None
        return vectors, have

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
                held_out = z["scope"].astype(np.float64)
                with_none = bool(z["with_none"])
        except (OSError, ValueError, TypeError, KeyError, EOFError):
            return False
        if probe[0].shape != (clf.vectors.shape[1], clf.n_labels):
            return False
        if held_out.ndim != 2 or held_out.shape[1] != N_FEATURES or not len(held_out):
            return False
        if with_none != (clf.none_vectors is not None):
            return False
        clf.params, clf.probe = params, probe
        clf.scope = Scope(held_out, with_none)
        with contextlib.suppress(OSError):
            os.utime(path)
        return True

    def save_params(self, key: str, clf: ExampleClassifier) -> None:
        path = self._params_file(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        w, b = clf.probe if clf.probe is not None else (np.zeros((0, 0)), np.zeros(0))
        held_out = clf.scope.features if clf.scope is not None else np.zeros((0, N_FEATURES))
        with_none = clf.scope.with_none if clf.scope is not None else False
        tmp = path.with_suffix(".tmp.npz")
        with tmp.open("wb") as f:
            np.savez(
                f,
                params=np.array(json.dumps(asdict(clf.params))),
                w=w,
                b=b,
                scope=held_out,
                with_none=np.array(with_none),
            )
        tmp.replace(path)
        self._prune(path)

    def _vectors_file(self, key: str) -> Path:
        return self.folder / f"{key.removesuffix(LABEL_SCORING)}.npy"

    def _partial_file(self, key: str) -> Path:
        return self.folder / f"{key.removesuffix(LABEL_SCORING)}.partial.npz"

    def _texts_file(self, key: str) -> Path:
        return self.folder / f"{key.removesuffix(LABEL_SCORING)}.texts"

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
                self._texts_file(key).name,
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


def _hashes(texts: tuple[str, ...]) -> npt.NDArray[np.uint8]:
    """16 bytes of SHA-256 per text: (n, 16)."""
    out = np.zeros((len(texts), 16), np.uint8)
    for i, t in enumerate(texts):
        out[i] = np.frombuffer(hashlib.sha256(t.encode()).digest()[:16], np.uint8)
    return out
