"""Labelled sets for `sidecar eval`: a CSV of texts with a label (Classify) or with the
JSON an extraction should give (Extract), or a config task's held-out file.

Every problem with a file is an `EvalInputError` whose message names the file, the line
and what to fix; the CLI prints it and exits 2 (bad input), before any request is sent.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Kind = Literal["classify", "extract"]
KINDS: tuple[Kind, ...] = ("classify", "extract")


class EvalInputError(Exception):
    """A labelled set, or the options naming its columns, cannot be evaluated."""


@dataclass(frozen=True)
class Row:
    text: str
    label: str = ""  # Classify: the right label
    expected: Mapping[str, Any] = field(default_factory=dict)  # Extract: the right fields
    line: int = 0  # in the file, for messages
    sensitive: bool = False  # the request says so: it must never leave the machine


@dataclass(frozen=True)
class EvalSet:
    kind: Kind
    source: Path
    rows: tuple[Row, ...]
    task: str = ""  # Classify by a config task's examples; "" = by the labels alone
    labels: tuple[str, ...] = ()  # Classify by labels alone: the set's distinct labels
    schema: Mapping[str, Any] = field(default_factory=dict)  # Extract


@dataclass(frozen=True)
class Columns:
    text: str = "text"
    label: str = "label"
    expected: str = "expected"
    sensitive: str = "sensitive"  # optional: true/1/yes marks a row's request sensitive


def _records(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) per data row; the header is checked by the caller."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise EvalInputError(f"{path} is empty: a header row and labelled rows expected")
            for row in reader:
                yield reader.line_num, row
    except OSError as e:
        raise EvalInputError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise EvalInputError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise EvalInputError(f"{path} is not a readable CSV file: {e}") from None


def header(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            names = csv.DictReader(f).fieldnames
    except OSError as e:
        raise EvalInputError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise EvalInputError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not names:
        raise EvalInputError(f"{path} is empty: a header row and labelled rows expected")
    return list(names)


def kind_of(path: Path, columns: Columns, kind: Kind | None) -> Kind:
    """The kind asked for, else the one the columns say: a label column is Classify, an
    expected-JSON column Extract."""
    names = header(path)
    if kind is not None:
        return kind
    if columns.label in names:
        return "classify"
    if columns.expected in names:
        return "extract"
    raise EvalInputError(
        f"{path} has neither a label column {columns.label!r} (Classify) nor an expected-JSON "
        f"column {columns.expected!r} (Extract); its columns: {', '.join(names)} "
        "(name them with --label-column or --expected-column)"
    )


def _need(path: Path, names: list[str], column: str, what: str, option: str) -> None:
    if column not in names:
        raise EvalInputError(
            f"{path} has no {what} column {column!r} (its columns: {', '.join(names)}); "
            f"name it with {option}"
        )


TRUE, FALSE = {"true", "1", "yes", "y"}, {"false", "0", "no", "n", ""}


def _flag(path: Path, line: int, r: Mapping[str, str | None], columns: Columns) -> bool:
    value = (r.get(columns.sensitive) or "").strip().lower()
    if value not in TRUE | FALSE:
        raise EvalInputError(
            f"{path} line {line}: column {columns.sensitive!r} must be true or false, not {value!r}"
        )
    return value in TRUE


def load_classify(path: Path, columns: Columns, task: str = "") -> EvalSet:
    """Rows of text and label. By labels alone (no `task`) the labels asked for are the
    set's own distinct labels, so it needs at least 2."""
    names = header(path)
    _need(path, names, columns.text, "text", "--text-column")
    _need(path, names, columns.label, "label", "--label-column")
    rows = []
    for line, r in _records(path):
        text, label = (r.get(columns.text) or "").strip(), (r.get(columns.label) or "").strip()
        if not text and not label:
            continue  # a blank line
        if not text:
            raise EvalInputError(f"{path} line {line}: the text is empty")
        if not label:
            raise EvalInputError(f"{path} line {line}: the label is empty")
        rows.append(Row(text, label=label, line=line, sensitive=_flag(path, line, r, columns)))
    if not rows:
        raise EvalInputError(f"{path} has no labelled rows")
    labels = tuple(sorted({r.label for r in rows}))
    if not task and len(labels) < 2:
        raise EvalInputError(
            f"{path} has only the label {labels[0]!r}: Classify by labels alone needs at least "
            "2 (or classify by a config task's examples with --task)"
        )
    return EvalSet("classify", path, tuple(rows), task=task, labels=() if task else labels)


def load_extract(path: Path, columns: Columns, schema: Mapping[str, Any] | None) -> EvalSet:
    """Rows of text and the JSON object an extraction should give. Without a `schema`, one
    is made from the expected objects (`schema_from`)."""
    names = header(path)
    _need(path, names, columns.text, "text", "--text-column")
    _need(path, names, columns.expected, "expected-JSON", "--expected-column")
    rows = []
    for line, r in _records(path):
        text, raw = (r.get(columns.text) or "").strip(), (r.get(columns.expected) or "").strip()
        if not text and not raw:
            continue
        if not text:
            raise EvalInputError(f"{path} line {line}: the text is empty")
        try:
            expected = json.loads(raw)
        except json.JSONDecodeError as e:
            raise EvalInputError(
                f"{path} line {line}: column {columns.expected!r} is not valid JSON ({e.msg} at "
                f"character {e.pos}): {raw[:60]!r}"
            ) from None
        if not isinstance(expected, dict) or not expected:
            raise EvalInputError(
                f"{path} line {line}: column {columns.expected!r} must be a JSON object with the "
                f"fields to extract, not {raw[:60]!r}"
            )
        rows.append(
            Row(text, expected=expected, line=line, sensitive=_flag(path, line, r, columns))
        )
    if not rows:
        raise EvalInputError(f"{path} has no labelled rows")
    made = schema if schema is not None else schema_from([r.expected for r in rows])
    return EvalSet("extract", path, tuple(rows), schema=made)


_JSON_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
               (list, "array"), (dict, "object"), (type(None), "null"))  # fmt: skip


def schema_from(objects: list[Mapping[str, Any]]) -> dict[str, Any]:
    """A JSON Schema every expected object fits: each field that appears, required, typed
    by the values seen (null allowed where a row has none), so the model must answer every
    field and may say it is absent where the set says so."""
    seen: dict[str, set[str]] = {}
    for obj in objects:
        for k, v in obj.items():
            seen.setdefault(k, set()).add(next(n for t, n in _JSON_TYPES if isinstance(v, t)))
    props = {}
    for k, types in seen.items():
        if {"integer", "number"} <= types:
            types.discard("integer")
        missing = any(k not in obj for obj in objects)
        if missing:
            types.add("null")
        ordered = sorted(types, key=lambda n: (n == "null", n))
        props[k] = {"type": ordered[0] if len(ordered) == 1 else ordered}
    return {"type": "object", "properties": props, "required": list(props)}


def load(
    path: Path,
    columns: Columns,
    *,
    kind: Kind | None = None,
    task: str = "",
    schema: Mapping[str, Any] | None = None,
) -> EvalSet:
    """The set in `path`, of the kind asked for or the one its columns say."""
    if kind_of(path, columns, kind) == "classify":
        if schema is not None:
            raise EvalInputError("--schema is for Extract sets; this one is Classify")
        return load_classify(path, columns, task)
    if task:
        raise EvalInputError("--task is for Classify sets; this one is Extract")
    return load_extract(path, columns, schema)


def parse_schema(text: str) -> dict[str, Any]:
    """--schema: JSON Schema text, or @FILE."""
    where = "--schema"
    if text.startswith("@"):
        where = text[1:]
        try:
            text = Path(where).read_text(encoding="utf-8")
        except OSError as e:
            raise EvalInputError(f"cannot read {where}: {e.strerror or e}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise EvalInputError(f"{where} is not valid JSON: {e.msg} at character {e.pos}") from None
    if not isinstance(doc, dict):
        raise EvalInputError(f"{where} must be a JSON Schema object")
    return doc
