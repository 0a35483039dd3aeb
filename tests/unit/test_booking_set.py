"""The restaurant-booking Extract set (tests/data/restaurant-bookings) stays loadable and
consistent: every expected object fits the schema it is evaluated with, and the rows are
distinct messages (a held-out set with duplicates overstates what it measures)."""

from __future__ import annotations

from pathlib import Path

import jsonschema

from sidecar.evaluation.dataset import Columns, load, parse_schema

HERE = Path(__file__).parent.parent / "data" / "restaurant-bookings"


def test_the_booking_set_fits_its_schema() -> None:
    schema = parse_schema(f"@{HERE / 'booking.schema.json'}")
    s = load(HERE / "bookings.csv", Columns(), schema=schema)
    assert s.kind == "extract" and len(s.rows) == 40
    assert len({r.text for r in s.rows}) == 40
    for r in s.rows:
        jsonschema.validate(r.expected, schema)
        assert set(r.expected) == set(schema["required"]), r.line
