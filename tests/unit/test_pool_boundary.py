"""The pool is driven through its public methods: no module but pool.py reaches into it."""

from __future__ import annotations

import re
from pathlib import Path

import sidecar

PRIVATE_REACH = re.compile(r"\bpools?\b(\[[^\]]*\])?\._[a-z]")


def test_no_module_outside_the_pool_touches_its_private_parts() -> None:
    root = Path(sidecar.__file__).parent
    offenders = [
        f"{path.relative_to(root)}:{n}: {line.strip()}"
        for path in root.rglob("*.py")
        if path.name != "pool.py" and "v1" not in path.parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE_REACH.search(line)
    ]
    assert offenders == []


def test_the_pattern_catches_what_it_is_for() -> None:
    for line in ("slots = [pool._make_slot(spec, pool)]", "pools['a']._slots", "pool._dispatch()"):
        assert PRIVATE_REACH.search(line), line
    assert not PRIVATE_REACH.search("pool.route_to(slots, ref, spec)")
