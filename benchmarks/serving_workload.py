"""What `scripts/bench` asks every backend to do: the prompts, labels and sizes."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

LABELS = (
    "lost_or_stolen_card",
    "card_arrival",
    "exchange_rate",
    "top_up_failed",
    "pin_blocked",
    "declined_transfer",
)
# A raw prompt SmolLM2 continues for well over 128 tokens under greedy decoding (the bare
# instruction "Write a short story about a lighthouse keeper." gets an immediate EOS).
STORY = "Write a short story about a lighthouse keeper.\n\nThe lighthouse keeper"
DECODE_TOKENS = 128
SHORT_TOKENS = 16
BATCH = 512  # the daemon's default `batch` (n_batch = n_ubatch)


def banking_texts(path: Path, per_label: int) -> list[tuple[str, str]]:
    """(text, category) rows of the six labels, interleaved, `per_label` of each."""
    by: dict[str, list[str]] = {lab: [] for lab in LABELS}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            cat = row.get("category") or row.get("label") or ""
            if cat in by and len(by[cat]) < per_label:
                by[cat].append(row["text"])
    rows = []
    for i in range(per_label):
        for lab in LABELS:
            if i < len(by[lab]):
                rows.append((by[lab][i], lab))
    return rows


def short_texts(path: Path, n: int) -> list[str]:
    """The first `n` Banking77 texts: distinct short questions of about 10-20 tokens."""
    with open(path, newline="") as f:
        return [row["text"] for row in itertools.islice(csv.DictReader(f), n)]


def short_prompts(path: Path, n: int) -> list[str]:
    """Distinct short prompts (so no backend gets a free ride from prompt-prefix caching)."""
    return [f"Customer message: {text}\nReply:" for text in short_texts(path, n)]


def rotate(xs: list[str], i: int) -> list[str]:
    """`xs` starting at its (i mod n)-th item: who goes first changes every round."""
    k = i % len(xs)
    return xs[k:] + xs[:k]
