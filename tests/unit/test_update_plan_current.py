"""A published version the store already holds is a normal case, not an internal error."""

from __future__ import annotations

from test_update_plan import FULL, V, delta, manifest  # type: ignore[import-not-found]

from sidecar.update.plan import cheapest


def test_a_held_target_needs_no_download_and_says_so() -> None:
    plan = cheapest(manifest(delta(3, 4, 10)), {V[3], V[4]})
    assert not plan.full and not plan.steps and plan.download_bytes == 0
    assert plan.base_sha256 is None
    text = plan.describe()  # raised IndexError: the plan has no steps
    assert "no download" in text and "store" in text
    assert plan.full_bytes == FULL
