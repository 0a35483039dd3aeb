"""The CLI's `--json` output: one stable JSON shape for every reply, whatever its values.

Protobuf's own JSON mapping is made for protobuf readers: it leaves out fields at their
zero value (a worker's `requests` vanishes at 0), writes 64-bit integers as strings and
enum values as their full names. Scripts want the opposite, so here:

- every field is present: scalars and lists with their value (zero included); a
  submessage or an `optional` scalar that is not set is `null`;
- integers are JSON numbers, 64-bit ones too;
- enum values are the value's name without the enum's prefix, in lower case
  (`FINISH_REASON_STOP` is `"stop"`), as the HTTP API and `served_by` write them;
- a non-finite float (a label the cloud did not pick has logprob -inf) is `null`: JSON
  has no infinity, and a string in a number field breaks typed readers;
- `bytes` fields (a token's raw bytes) are lists of byte values (`[72, 105]`), as the
  OpenAI API writes a logprob's bytes;
- field names are the proto's (`completion_tokens`), as in the docs.

A command prints one object (`dumps`, indented), or for a stream of progress messages one
object per line (`dumps_line`, JSON Lines). docs/client.md lists each command's shape.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

_INT64 = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
_FLOATS = frozenset({FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT})


def to_dict(message: Message) -> dict[str, Any]:
    """`message` as plain JSON-ready data in the stable shape described above."""
    raw = MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _message(message, raw)


def dumps(message: Message | dict[str, Any]) -> str:
    """One JSON document, indented (a plain dict is written as it is)."""
    data = message if isinstance(message, dict) else to_dict(message)
    return json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False)


def dumps_line(message: Message | dict[str, Any]) -> str:
    """One JSON document on one line, for JSON Lines output (a stream of progress)."""
    data = message if isinstance(message, dict) else to_dict(message)
    return json.dumps(data, ensure_ascii=False, allow_nan=False)


def _message(message: Message, raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fields: Any = message.DESCRIPTOR.fields  # typed loosely by protobuf's stubs
    for f in fields:
        name = f.name
        value = raw.get(name)
        if _is_map(f):
            value_field = f.message_type.fields_by_name["value"]
            live = getattr(message, name)
            out[name] = {
                k: _value(value_field, live[_key(f, k)], v) for k, v in (value or {}).items()
            }
        elif f.is_repeated:
            live = getattr(message, name)
            out[name] = [_value(f, live[i], v) for i, v in enumerate(value or [])]
        elif f.has_presence and not message.HasField(name):
            out[name] = None
        else:
            out[name] = _value(f, getattr(message, name), value)
    return out


def _value(f: Any, live: Any, raw: Any) -> Any:
    if f.message_type is not None:
        return _message(live, raw)
    if f.type in _INT64:
        return int(raw)
    if f.type in _FLOATS:
        return raw if isinstance(raw, int | float) and math.isfinite(raw) else None
    if f.type == FieldDescriptor.TYPE_ENUM:
        return _enum_name(f.enum_type, raw)
    if f.type == FieldDescriptor.TYPE_BYTES:
        return list(live)
    return raw


def _is_map(f: Any) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


def _key(f: Any, key: str) -> Any:
    """A map key as the message holds it (JSON writes every key as a string)."""
    t = f.message_type.fields_by_name["key"].type
    if t == FieldDescriptor.TYPE_BOOL:
        return key == "true"
    return key if t == FieldDescriptor.TYPE_STRING else int(key)


def _enum_name(enum: Any, raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw  # a number this build does not know: keep it
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
    return (raw[len(prefix) :] if raw.startswith(prefix) else raw).lower()
