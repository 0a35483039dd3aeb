"""The model store: named models, versions addressed by sha256, an atomic "active" pointer.

    <root>/blobs/<sha256>.gguf          immutable, verified model files (the store's own inodes)
    <root>/verified/<sha256>            size, mtime, inode and ctime of the blob when last hashed
    <root>/models/<name>/versions/<sha> membership markers (a blob may serve several names)
    <root>/models/<name>/active         the sha256 serving <name>; written atomically
    <root>/models/<name>/previous       the one before, kept by gc for rollback
    <root>/models/<name>/seed           the configured file that last seeded <name>
    <root>/quarantine/                  refused files (0600, dir 0700), each with a .reason
                                        (a record alone when the file was not ours to copy)

Every write is atomic (a *.partial file, fsync, verify, os.replace, fsync the directory),
so after a kill -9 at any moment the store holds only complete, verified files and the
pointers name one of them. Partial files are never read as models and are swept on open.

The store owns its bytes. An import copies (or reflinks, which is copy-on-write) and never
hardlinks: a shared inode would let whoever writes the original file rewrite a blob under
its old version label. The caller's file is only read, never moved or chmodded. A blob is
re-verified before a stored version is loaded again (`verify`): a stat compared with the
one recorded when it was last hashed, and a full sha256 when they differ.

Names come from callers, so every path is built by `_model_dir`, which checks the name
(sidecar.domain.names) and refuses anything that would resolve outside `<root>/models`.

What may be deleted: `remove` and `gc` never touch a version that a live worker maps (the
caller passes those, read from the workers' real mappings), that is being swapped in
(`hold`), or that any name's active or previous pointer names. `gc` also leaves alone the
versions of a name that has never been activated: they were added on purpose and nothing
has replaced them. The quarantine keeps only its newest entries (`quarantine_cleanup`).

Encrypted stores (`store.encryption`): every blob and quarantined file is sealed
(`sealed`: chunked AES-256-GCM, named by the sha256 of its plaintext as before); every read
of a blob's bytes goes through `ModelStore.open_plain`, every write through its sealing
copy; workers map a decrypted copy held in a sealed memfd (`images`), never a file.

Modules: `model_store` (blobs, versions, pointers, gc), `quarantine` (refused files and
their bound), `seed` (which file serves a model at start), `sealed` (the encrypted blob
format), `keys` (where keys come from), `images` (decrypted copies in memory), `opening`
(the store a config names, with its keys), `rekey` (re-sealing every blob to a new key).
"""

from sidecar.domain.versions import VersionInfo
from sidecar.store.model_store import BlobChanged, ModelStore
from sidecar.store.opening import open_store
from sidecar.store.seed import startup_blob

__all__ = ["BlobChanged", "ModelStore", "VersionInfo", "open_store", "startup_blob"]
