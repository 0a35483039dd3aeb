"""LoRA adapters in the store: which file may be an adapter of which model.

An adapter is a llama.cpp LoRA GGUF (general.type "adapter", adapter.type "lora") whose
tensors are pairs `<base tensor>.lora_a` / `.lora_b`. Stored like a model (a blob in the
same blobs/ directory, a versions marker, active and previous pointers), under
<root>/adapters/<base model>/<adapter>/ (`ModelStore.view`), so gc, holds, verification and
quarantine are the store's own.

The checks here read only headers (sidecar's GGUF reader; the daemon never loads llama.cpp)
and mirror what llama.cpp's loader (src/llama-adapter.cpp) would refuse, so that a file
that cannot serve is turned away at add time with a reason, not by a worker later. Shapes
are in ggml order (ne[0] first, as the file stores them): a base weight is (n_in, n_out),
lora_a is (n_in, rank) and lora_b is (rank, n_out); for token_embd, A and B are swapped.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

from sidecar.domain.errors import FailedPrecondition, InvalidRequest, SidecarError
from sidecar.domain.names import check_name, split_adapter
from sidecar.domain.versions import VersionInfo
from sidecar.gguf_check import GGUFError, GGUFInfo, TensorInfo
from sidecar.store.model_store import ModelStore

SUFFIXES = (".lora_a", ".lora_b")


@dataclass(frozen=True)
class AdapterFacts:
    """What the store and the replies say about a checked adapter."""

    architecture: str
    alpha: float
    rank: int
    tensors: int  # A/B pairs


def is_adapter(info: GGUFInfo) -> bool:
    return info.metadata.get("general.type") == "adapter"


def check_adapter(adapter: GGUFInfo, base: GGUFInfo, base_name: str, where: Path) -> AdapterFacts:
    """Refuse `adapter` unless llama.cpp could apply it to `base`; the reason names what differs.

    Not a LoRA file at all: InvalidRequest (INVALID_ARGUMENT). A LoRA file made for another
    model (architecture, a tensor the model lacks, other dimensions): FailedPrecondition."""
    kind = adapter.metadata.get("general.type", "")
    if kind != "adapter":
        raise InvalidRequest(
            f"{where} is not a LoRA adapter: its general.type is {str(kind or 'unset')!r}, "
            "not 'adapter' (add a model without --adapter-for)"
        )
    lora = adapter.metadata.get("adapter.type", "")
    if lora != "lora":
        raise InvalidRequest(
            f"{where} is an adapter of type {str(lora or 'unset')!r}; only 'lora' is supported"
        )
    if adapter.architecture != base.architecture:
        raise FailedPrecondition(
            f"{where} is a LoRA adapter for architecture {adapter.architecture!r}, but model "
            f"{base_name!r} is {base.architecture!r}"
        )
    pairs: dict[str, dict[str, TensorInfo]] = {}
    for t in adapter.tensors:
        suffix = next((s for s in SUFFIXES if t.name.endswith(s)), None)
        if suffix is None:
            if t.name.endswith("_norm.weight"):
                continue  # llama.cpp skips these too
            raise InvalidRequest(
                f"{where}: tensor {t.name!r} is not a LoRA tensor (.lora_a or .lora_b)"
            )
        pairs.setdefault(t.name[: -len(suffix)], {})[suffix] = t
    if not pairs:
        raise InvalidRequest(f"{where} has no LoRA tensors")
    tensors = {t.name: t for t in base.tensors}
    ranks = set()
    for name, ab in sorted(pairs.items()):
        if len(ab) != 2:
            missing = next(s for s in SUFFIXES if s not in ab)
            raise InvalidRequest(
                f"{where}: {name}{missing} is missing (LoRA tensors come in pairs)"
            )
        target = tensors.get(name)
        if target is None:
            raise FailedPrecondition(
                f"{where} adapts tensor {name!r}, which model {base_name!r} does not have "
                "(an adapter for another model?)"
            )
        a, b = ab[".lora_a"].shape, ab[".lora_b"].shape
        if len(a) != 2 or len(b) != 2 or len(target.shape) < 2:
            raise InvalidRequest(f"{where}: {name}'s LoRA tensors are not matrices")
        if name.endswith("token_embd.weight"):
            fits, rank = target.shape[0] == b[1] and target.shape[1] == a[1], b[0]
        else:
            fits, rank = target.shape[0] == a[0] and target.shape[1] == b[1], a[1]
            if a[1] != b[0]:
                raise InvalidRequest(
                    f"{where}: {name}.lora_a {list(a)} and .lora_b {list(b)} disagree on the rank"
                )
        if not fits:
            raise FailedPrecondition(
                f"{where}: {name} is {list(target.shape[:2])} in model {base_name!r}, but the "
                f"adapter's lora_a is {list(a)} and lora_b {list(b)} (an adapter for a model "
                "of other dimensions?)"
            )
        ranks.add(rank)
    alpha = adapter.metadata.get("adapter.lora.alpha", 0.0)
    return AdapterFacts(
        adapter.architecture,
        float(alpha) if isinstance(alpha, int | float) else 0.0,
        max(ranks),
        len(pairs),
    )


def add(store: ModelStore, base: str, base_file: Path, name: str, src: Path) -> str:
    """Copy a LoRA file into the store as a version of `base`'s adapter `name`, checked
    against the model file `base` serves; return its sha256. Blocking (a thread).

    The caller's file is checked where it lies (a file that cannot be an adapter of this
    model is never copied), and the copy again (it, not the caller's file, is served)."""
    check_name(name)
    try:
        base_info = store.gguf(base_file)  # a blob: sealed on an encrypted store
    except (GGUFError, OSError) as e:
        raise FailedPrecondition(f"cannot read model {base!r} ({base_file}): {e}") from None
    try:
        check_adapter(store.gguf(src), base_info, base, src)
    except GGUFError as e:
        raise GGUFError(f"{src}: {e.message}") from None
    except OSError as e:
        raise InvalidRequest(f"cannot read {src}: {e.strerror or e}") from None
    view = store.view(base)
    sha = view.add(src, name, hold=True)
    try:
        check_adapter(store.gguf(view.blob(sha)), base_info, base, src)
    except Exception:
        store.release(sha)
        with contextlib.suppress(SidecarError):
            view.remove(name, sha, {})
        raise
    store.release(sha)
    return sha


def listing(store: ModelStore) -> list[VersionInfo]:
    """Every stored adapter version, named MODEL:ADAPTER."""
    out = []
    for space in store.spaces()[1:]:
        out += [replace(v, name=f"{space.label}{v.name}") for v in space.all_versions()]
    return out


split = split_adapter  # MODEL:ADAPTER as (model, adapter); None for a plain model name
