"""Token counters label callers by class, never by key: the key is unbounded."""

from __future__ import annotations

import pytest

from sidecar.metrics import CALLER_CLASSES, caller_class


@pytest.mark.parametrize(
    ("prefix", "cls"),
    [
        ("uid:1000/pid:42", "uid"),
        ("uid:1000/app:mail", "uid"),
        ("token:0123456789ab", "token"),
        ("app:mail", "app"),
        ("peer:ipv4:127.0.0.1:5000", "peer"),
        ("http:127.0.0.1", "peer"),
        ("gremlin", "other"),
        ("weird:x", "other"),
    ],
)
def test_caller_keys_map_to_a_few_classes(prefix: str, cls: str) -> None:
    assert caller_class(prefix) == cls
    assert caller_class(prefix) in CALLER_CLASSES
