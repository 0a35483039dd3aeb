"""Model names: the one check every path that takes a name uses, and the one way to echo one.

A model name becomes a directory in the store, a label in metrics and a word in log lines,
so it is held to a charset that is safe in all three: [A-Za-z0-9._-], 1-64 characters, not
starting with '.' (no hidden files, no '.' or '..'). Names a caller sends that are not
loaded are echoed back short and escaped (`shown`), never whole: a 1 MB name or one with a
newline must not reach a reply or a log line as it came.
"""

from __future__ import annotations

import re

from sidecar.domain.errors import InvalidRequest

MAX_NAME = 64
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_SHOWN = 40  # characters of a bad name worth echoing back


def shown(name: str, limit: int = _SHOWN) -> str:
    """`name` as it may appear in a message: repr-escaped and cut to about `limit` characters."""
    if len(name) <= limit:
        return repr(name)
    return f"{name[:limit]!r}... ({len(name)} characters)"


def name_problem(name: str) -> str | None:
    """None if `name` is a valid model name, else what is wrong with it (for any error type)."""
    if _NAME.fullmatch(name):
        return None
    if not name:
        return "a model name must not be empty"
    return (
        f"bad model name {shown(name)}: use 1-{MAX_NAME} characters from A-Z a-z 0-9 . _ -, "
        "not starting with '.'"
    )


def check_name(name: str) -> str:
    """`name` if it is a valid model name; InvalidRequest (INVALID_ARGUMENT) otherwise."""
    problem = name_problem(name)
    if problem:
        raise InvalidRequest(problem)
    return name


def split_adapter(target: str) -> tuple[str, str] | None:
    """ "MODEL:ADAPTER" as (model, adapter), both valid names; None without a colon.

    Every front end that takes the combined form parses it here, so that "smol:" (an empty
    adapter) can never mean the bare model and "smol:a:b" or "smol:a@v1" get a reason."""
    base, colon, adapter = target.partition(":")
    if not colon:
        return None
    if ":" in adapter:
        raise InvalidRequest(
            f"{shown(target)} has more than one ':': name one adapter as MODEL:ADAPTER"
        )
    if "@" in adapter:
        raise InvalidRequest(
            f"{shown(target)}: a request cannot choose an adapter's version; send "
            f"MODEL:ADAPTER and the active version answers (`sidecar models swap` changes it)"
        )
    if not base:
        raise InvalidRequest(f"{shown(target)}: name the model before the ':' (MODEL:ADAPTER)")
    if not adapter:
        raise InvalidRequest(
            f"{shown(target)}: name the adapter after the ':' (MODEL:ADAPTER), or send the "
            "model name alone for the model without an adapter"
        )
    return check_name(base), check_name(adapter)
