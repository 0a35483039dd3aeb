"""Which bytes to fetch: the cheapest chain of deltas from what we have, or the full file.

Pure (table-tested): the manifest says which deltas exist between which full-file
hashes; we know which hashes the store holds. A delta chain starts at any version we
hold (not only the serving one) and is priced by the bytes it downloads.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from sidecar.update.manifest import DeltaEntry, Manifest


@dataclass(frozen=True)
class Plan:
    target_sha256: str
    steps: tuple[DeltaEntry, ...]  # empty: the full file (full=True) or nothing (held)
    full: bool
    download_bytes: int
    full_bytes: int

    @property
    def base_sha256(self) -> str | None:
        return self.steps[0].from_sha256 if self.steps else None

    def describe(self) -> str:
        if self.full:
            return f"full file ({self.full_bytes} bytes)"
        if not self.steps:  # the store holds the target (e.g. added, or swapped away from)
            return "no download: the version is in the store already"
        chain = " -> ".join(
            [f"v{self.steps[0].from_version}", *(f"v{s.to_version}" for s in self.steps)]
        )
        return f"delta {chain} ({self.download_bytes} of {self.full_bytes} bytes)"


def cheapest(manifest: Manifest, held: set[str], *, avoid: frozenset[str] = frozenset()) -> Plan:
    """Fewest downloaded bytes from any held hash to the manifest's file (Dijkstra over deltas).

    `avoid` names delta files (by their sha256) that failed before, so a broken delta
    is not retried forever: the client falls back to the full file by itself.
    """
    target = manifest.sha256
    full = Plan(target, (), True, manifest.size, manifest.size)
    edges: dict[str, list[DeltaEntry]] = {}
    for d in manifest.deltas:
        if d.sha256 not in avoid:
            edges.setdefault(d.from_sha256, []).append(d)
    best: dict[str, int] = {}
    queue: list[tuple[int, int, str, tuple[DeltaEntry, ...]]] = []
    for n, sha in enumerate(sorted(held)):
        heapq.heappush(queue, (0, n, sha, ()))
    counter = len(held)
    while queue:
        cost, _, sha, path = heapq.heappop(queue)
        if sha in best:
            continue
        best[sha] = cost
        if sha == target:
            if not path:  # already held: nothing to download
                return Plan(target, (), False, 0, manifest.size)
            if cost < full.download_bytes:
                return Plan(target, path, False, cost, manifest.size)
            return full
        if cost >= full.download_bytes:
            continue
        for d in edges.get(sha, []):
            if d.to_sha256 not in best:
                counter += 1
                heapq.heappush(queue, (cost + d.size, counter, d.to_sha256, (*path, d)))
    return full
