"""Labelled examples for Classify: given in a request, or a task's CSV file named in config.

A task's out-of-scope examples (rows labelled with its `none_label`, and the texts of its
`none_file`) travel in the same set under the label `NONE`, so they are embedded and
cached with the rest; they are never a label (`label_names`, `in_scope`).
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from sidecar.domain.errors import FailedPrecondition, InvalidRequest

NONE = "\x00none"  # the label of out-of-scope examples in a set; no CSV or request label


@dataclass(frozen=True)
class ExampleSet:
    texts: tuple[str, ...]
    labels: tuple[str, ...]  # one per text

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise InvalidRequest("every example needs one text and one label")

    @property
    def label_names(self) -> tuple[str, ...]:
        """Distinct labels in first-seen order (out-of-scope examples have none)."""
        return tuple(y for y in dict.fromkeys(self.labels) if y != NONE)

    def in_scope(self) -> ExampleSet:
        """The examples that carry a label."""
        rows = [(t, y) for t, y in zip(self.texts, self.labels, strict=True) if y != NONE]
        return ExampleSet(tuple(t for t, _ in rows), tuple(y for _, y in rows))

    @property
    def none_texts(self) -> tuple[str, ...]:
        """The out-of-scope examples' texts."""
        return tuple(t for t, y in zip(self.texts, self.labels, strict=True) if y == NONE)

    def digest(self, model_version: str) -> str:
        """Content hash of the examples and the model that embeds them: the cache key."""
        h = hashlib.sha256(model_version.encode())
        for text, label in zip(self.texts, self.labels, strict=True):
            h.update(b"\x00" + text.encode() + b"\x01" + label.encode())
        return h.hexdigest()


def check(examples: ExampleSet, max_examples: int) -> None:
    """Bad example sets get an error that says what to fix."""
    if len(examples.texts) > max_examples:
        raise InvalidRequest(
            f"{len(examples.texts)} examples; at most {max_examples} per request "
            "(define a task in the config for larger sets)"
        )
    for i, (text, label) in enumerate(zip(examples.texts, examples.labels, strict=True)):
        if not text.strip():
            raise InvalidRequest(f"examples[{i}].text is empty")
        if not label.strip():
            raise InvalidRequest(f"examples[{i}].label is empty")
    if len(examples.label_names) < 2:
        raise InvalidRequest("examples must cover at least 2 distinct labels")


def load_task(
    path: Path,
    text_column: str,
    label_column: str,
    none_label: str = "",
    none_file: Path | None = None,
) -> ExampleSet:
    """A task's examples, its out-of-scope ones labelled `NONE`; a task needs 2 labels."""
    examples = load_csv(path, text_column, label_column)
    labels = tuple(NONE if none_label and y == none_label else y for y in examples.labels)
    texts = examples.texts
    if none_file:  # None, or "" in a TaskConfig built directly
        extra = load_texts(none_file, text_column)
        texts, labels = texts + extra, labels + (NONE,) * len(extra)
    out = ExampleSet(texts, labels)
    if len(out.label_names) < 2:
        besides = f" besides none_label {none_label!r}" if none_label else ""
        raise FailedPrecondition(
            f"examples file {path} has {len(out.label_names)} label(s){besides}; a task needs 2"
        )
    return out


def load_texts(path: Path, text_column: str) -> tuple[str, ...]:
    """A task's `none_file`: out-of-scope texts in the same text column."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            if text_column not in fields:
                raise FailedPrecondition(
                    f"none_file {path} has no column {text_column!r} "
                    f"(columns: {', '.join(fields) or 'none'})"
                )
            texts = [(r[text_column] or "").strip() for r in reader]
    except OSError as e:
        raise FailedPrecondition(f"cannot read none_file {path}: {e.strerror}") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise FailedPrecondition(f"none_file {path} is not valid UTF-8 CSV: {e}") from None
    texts = [t for t in texts if t]
    if not texts:
        raise FailedPrecondition(f"none_file {path} holds no texts")
    return tuple(texts)


def load_csv(path: Path, text_column: str, label_column: str) -> ExampleSet:
    """Read a task's examples; a missing file or column is a FailedPrecondition naming it."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            for col in (text_column, label_column):
                if col not in fields:
                    raise FailedPrecondition(
                        f"{path} has no column {col!r} (columns: {', '.join(fields) or 'none'})"
                    )
            rows = [(r[text_column] or "", r[label_column] or "") for r in reader]
    except OSError as e:
        raise FailedPrecondition(f"cannot read examples file {path}: {e.strerror}") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise FailedPrecondition(f"examples file {path} is not valid UTF-8 CSV: {e}") from None
    rows = [(t.strip(), y.strip()) for t, y in rows if t.strip() and y.strip()]
    if not rows:
        raise FailedPrecondition(f"examples file {path} holds no labelled rows")
    return ExampleSet(tuple(t for t, _ in rows), tuple(y for _, y in rows))
