"""Shadow traffic: a share (`cloud.shadow_rate`) of the AUTO requests answered locally is
also asked of the cloud, after the reply has gone, to measure how often the two agree.

Nothing here is on the request path: the router only draws and starts a task (no await),
the call and the bookkeeping run after the reply. At most `IN_FLIGHT` calls run at once;
more are dropped and counted, so a slow or hanging cloud costs a bounded number of tasks
and never a reply. Shadow calls have their own budget (`cloud.shadow_daily_cap`).

Agreement is kept per (key, model@version), the key being the fitted thresholds' own
(`task:NAME`, `classify:MODEL`, `extract:MODEL`): Classify agrees when the labels are
equal, Extract when the parsed JSON objects are equal. Counts and the last `SAMPLES`
(confidence, agreed) pairs survive restarts in `agreement.json`; disagreements go to one
JSONL file per key, a ring of the last `keep` (the file is cut back atomically when it
doubles), with the request text as the privacy gate redacts it. Only requests with no
finding at all are shadowed, so nothing stored here is text the rules keep from the cloud.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.domain.types import Classification, Extraction, Result
from sidecar.fileio import write_atomic
from sidecar.router.budget import Budget

log = logging.getLogger("sidecar.router")

IN_FLIGHT = 2  # shadow calls at once; more are dropped (counted)
AFTER_REPLY_S = 0.05  # a shadow call waits this long, so the reply it follows leaves first
SAMPLES = 1000  # (confidence, agreed) pairs kept per key and model, for recalibration
KEEP = 1000  # disagreements kept per key
AGREEMENT_FILE = "agreement.json"
# Recalibration: a threshold chosen from fewer pairs follows noise; and within bounds, so
# a run of lucky or unlucky pairs can neither keep everything local nor send all away.
MIN_RECALIBRATION_SAMPLES = 50
RECALIBRATION_BOUNDS = (0.5, 0.99)
# The agreement file is rewritten at most this often (and at close): serialising it holds
# the GIL, which the event loop serving replies needs.
SAVE_EVERY_S = 5.0
Z95 = 1.959963984540054


def wilson(agreed: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default); (0, 1) with no samples.
    Wilson rather than the normal approximation: it stays inside [0, 1] and is honest at
    rates near 1, where agreement usually is."""
    if total <= 0:
        return 0.0, 1.0
    p = agreed / total
    d = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / d
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def answer(result: Result) -> str:
    """What is compared of an answer, as stored and exported."""
    if isinstance(result, Classification):
        return result.label
    if isinstance(result, Extraction):
        return result.json
    return ""


def agree(local: Result, cloud: Result) -> bool:
    """Classify: the same label; Extract: equal JSON objects once parsed (key order and
    spacing do not count)."""
    if isinstance(local, Classification) and isinstance(cloud, Classification):
        return local.label == cloud.label
    if isinstance(local, Extraction) and isinstance(cloud, Extraction):
        try:
            return bool(json.loads(local.json) == json.loads(cloud.json))
        except ValueError:
            return False
    return False


def file_for(directory: Path, key: str) -> Path:
    """The disagreements file of a key: readable, and distinct for keys that differ only in
    characters a file name cannot hold."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)[:80]
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return directory / "disagreements" / f"{safe}-{digest}.jsonl"


def read_disagreements(directory: Path, key: str, keep: int = KEEP) -> list[dict[str, Any]]:
    """The kept disagreements of a key, oldest first; [] when there are none. A line cut
    short (the daemon stopped mid-write) is skipped."""
    try:
        lines = file_for(directory, key).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines[-keep:]:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            out.append(row)
    return out


def known_keys(directory: Path) -> list[str]:
    """The keys the daemon has shadow data for (from its agreement file)."""
    try:
        doc = json.loads((directory / AGREEMENT_FILE).read_text(encoding="utf-8"))
        return sorted({str(v["key"]) for v in doc["pairs"].values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


@dataclass
class Pair:
    """Local against cloud for one key and model version."""

    key: str
    model: str  # name@version that answered locally
    agreed: int = 0
    total: int = 0
    samples: list[tuple[float, bool]] = field(default_factory=list)  # (confidence, agreed)

    def interval(self) -> tuple[float, float]:
        return wilson(self.agreed, self.total)


@dataclass(frozen=True)
class Recalibrated:
    """A task's threshold chosen from its shadow pairs (tasks.NAME.target_accuracy)."""

    threshold: float
    key: str
    model: str
    target: float
    accuracy: float  # of the pairs kept at the threshold, the cloud's answer taken as right
    kept: float  # their share of the pairs
    samples: int
    clamped: str = ""  # "" | "at the lower bound" | "at the upper bound" | "target unreachable"

    def describe(self) -> str:
        why = f", {self.clamped}" if self.clamped else ""
        return (f"shadow ({self.key}: target accuracy {self.target:g} from {self.samples} "
                f"pairs of {self.model}{why})")  # fmt: skip


@dataclass
class Counts:
    sent: int = 0  # calls answered by the cloud and compared
    dropped: int = 0  # IN_FLIGHT calls were already running
    capped: int = 0  # the shadow budget was spent
    failed: int = 0  # the cloud failed or answered outside the contract


class Shadow:
    """The shadow traffic's state: draw, slots, budget, agreement and disagreements."""

    def __init__(
        self,
        directory: Path,
        budget: Budget,
        rate: float,
        *,
        keep: int = KEEP,
        draw: Callable[[], float] | None = None,
    ) -> None:
        import random

        self.directory = directory
        self.budget = budget
        self.rate = rate  # live: SIGHUP sets it
        self.keep = keep
        self._draw = draw or random.random
        self.counts = Counts()
        self.in_flight = 0
        self.pairs: dict[str, Pair] = {}
        self._lines: dict[str, int] = {}  # disagreement lines on disk, per key
        self._lock = threading.Lock()  # records run in threads
        self._saved = float("-inf")  # monotonic time of the last write of the agreement file
        self._dirty = False
        self._chosen: dict[str, tuple[tuple[int, int, float], Recalibrated]] = {}
        self._load()

    def wanted(self) -> bool:
        return self.rate > 0 and self._draw() < self.rate

    def _load(self) -> None:
        path = self.directory / AGREEMENT_FILE
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            for name, v in doc["pairs"].items():
                samples = [(float(c), bool(a)) for c, a in v.get("samples", [])]
                self.pairs[name] = Pair(str(v["key"]), str(v["model"]), int(v["agreed"]),
                                        int(v["total"]), samples[-SAMPLES:])  # fmt: skip
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            # A measurement, not a limit: start counting again rather than refuse to serve.
            log.error("shadow agreement file %s unreadable (%s): counting from zero", path, e)
            self.pairs = {}

    def save_budget(self, state: bytes) -> None:
        """Persist the shadow spending (Budget.state() taken on the loop). Blocking (an
        fsynced write): called in a thread; the lock keeps two writers off one file."""
        with self._lock:
            self.budget.save(state)

    def record(
        self, key: str, model: str, agreed: bool, confidence: float | None, row: dict[str, Any]
    ) -> None:
        """One compared pair: counted, and kept on disk when the answers differ. Blocking
        (file writes): called in a thread."""
        with self._lock:
            name = f"{key}|{model}"
            pair = self.pairs.setdefault(name, Pair(key, model))
            pair.total += 1
            pair.agreed += agreed
            if confidence is not None and math.isfinite(confidence):
                pair.samples.append((confidence, agreed))
                del pair.samples[:-SAMPLES]
            self.directory.mkdir(parents=True, exist_ok=True)
            if not agreed:
                self._keep(key, row)
            self._dirty = True
            if time.monotonic() - self._saved >= SAVE_EVERY_S:
                self._save()

    def flush(self) -> None:
        """Write the agreement file if anything changed since it was last written."""
        with self._lock:
            if self._dirty:
                self._save()

    def _save(self) -> None:
        doc = {"version": 1, "pairs": {
            k: {"key": p.key, "model": p.model, "agreed": p.agreed, "total": p.total,
                "samples": p.samples} for k, p in sorted(self.pairs.items())}}  # fmt: skip
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(self.directory / AGREEMENT_FILE, json.dumps(doc).encode())
        self._saved, self._dirty = time.monotonic(), False

    def _keep(self, key: str, row: dict[str, Any]) -> None:
        path = file_for(self.directory, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        if key not in self._lines:
            try:
                self._lines[key] = len(path.read_bytes().splitlines())
            except FileNotFoundError:
                self._lines[key] = 0
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                **row}, ensure_ascii=False) + "\n")  # fmt: skip
        self._lines[key] += 1
        # Cut back only when the file has doubled: a rewrite per `keep` appends, not per one.
        if self._lines[key] >= 2 * self.keep:
            last = path.read_bytes().splitlines()[-self.keep :]
            write_atomic(path, b"".join(line + b"\n" for line in last))
            self._lines[key] = len(last)

    def recalibrated(self, key: str, model: str, target: float) -> Recalibrated | None:
        """The threshold for `target` from the pairs of this key and model version; None
        while there are fewer than MIN_RECALIBRATION_SAMPLES. Cached until a pair is added.

        The pairs are of answers kept local, so they say nothing of confidences below the
        threshold in force when they were taken: the choice can raise a threshold that
        keeps too much, and lower one only as far as the confidences it has seen kept."""
        pair = self.pairs.get(f"{key}|{model}")
        if pair is None or len(pair.samples) < MIN_RECALIBRATION_SAMPLES:
            return None
        stamp = (len(pair.samples), pair.total, target)
        cached = self._chosen.get(f"{key}|{model}")
        if cached is not None and cached[0] == stamp:
            return cached[1]
        from sidecar.coverage import at_threshold, threshold_for_accuracy

        samples = list(pair.samples)  # one copy: records append in another thread
        conf = [c for c, _ in samples]
        ok = [a for _, a in samples]
        lo, hi = RECALIBRATION_BOUNDS
        got = threshold_for_accuracy(conf, ok, target)
        clamped = "" if got is not None else "target unreachable"
        t = got["threshold"] if got is not None else hi
        if t < lo:
            t, clamped = lo, "at the lower bound"
        elif t > hi:
            t, clamped = hi, "at the upper bound"
        kept = at_threshold(conf, ok, t)
        chosen = Recalibrated(t, key, model, target, kept["accuracy"], kept["coverage"],
                              len(conf), clamped)  # fmt: skip
        self._chosen[f"{key}|{model}"] = (stamp, chosen)
        return chosen

    def explain(self, key: str, model: str, target: float) -> str:
        """What recalibration chose for status, or why it has not yet."""
        chosen = self.recalibrated(key, model, target)
        if chosen is None:
            pair = self.pairs.get(f"{key}|{model}")
            n = len(pair.samples) if pair is not None else 0
            return (f"waiting: {n} of {MIN_RECALIBRATION_SAMPLES} pairs for target accuracy "
                    f"{target:g}")  # fmt: skip
        acc = "n/a" if math.isnan(chosen.accuracy) else f"{chosen.accuracy:.3f}"
        return (f"{chosen.threshold:.4g} for target accuracy {target:g} from {chosen.samples} "
                f"pairs (kept {chosen.kept:.3f} at accuracy {acc}"
                f"{', ' + chosen.clamped if chosen.clamped else ''})")  # fmt: skip

    def report(self) -> list[Pair]:
        with self._lock:
            return [Pair(p.key, p.model, p.agreed, p.total) for _, p in sorted(self.pairs.items())]
