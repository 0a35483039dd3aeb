"""`sidecar eval --html`: the report a real run writes, opened in real headless Chromium.
It renders, logs no error, fetches nothing but itself, and every plot is drawn: its SVG has
its marks, and a screenshot of it has them in colour (checked to see a plot emptied of its
marks as blank)."""

from __future__ import annotations

import asyncio
import csv
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from headless import CHROMIUM, Browser, pixels

from sidecar.cli.commands import main

MINI = Path(__file__).parent.parent / "data" / "banking77-mini"
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium not installed (SIDECAR_TEST_TOOLS=1 scripts/setup installs it as root)",
)
MARKS = {"reliability": "rect.bar", "coverage": "polyline.curve", "confusion": "rect.cell"}


@pytest.fixture
def browser() -> Iterator[Browser]:
    b = Browser()
    yield b
    b.close()


async def _report(serve, tiny_model: Path, tmp_path: Path, *args: str) -> Path:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model)
    out = tmp_path / "report.html"
    argv = ["eval", *args, "--html", str(out), "--socket", str(s.socket)]
    r = await asyncio.to_thread(CliRunner().invoke, main, argv)
    assert r.exit_code == 0, r.output
    assert f"report: {out}" in r.stderr
    return out


def coloured(png: bytes) -> int:
    """Pixels of the plots' blue or red (the marks), not white, grey or black (the frame)."""
    _, _, px = pixels(png)
    return sum(1 for p in px if abs(p[2] - p[0]) > 40)


def drawn(browser: Browser, page: Path) -> dict[str, tuple[int, int]]:
    """Per plot on the page: (its marks in the DOM, its coloured pixels on screen)."""
    browser.open(page.as_uri())
    found = {}
    for ident, marks in MARKS.items():
        box = browser.evaluate(
            f"(() => {{ const s = document.getElementById('{ident}'); if (!s) return null;"
            " const r = s.getBoundingClientRect();"
            f" return [r.x, r.y + window.scrollY, r.width, r.height, s.querySelectorAll('{marks}').length]; }})()"
        )
        if box is not None:
            x, y, w, h, n = box
            found[ident] = (n, coloured(browser.screenshot(x, y, w, h)))
    return found


@needs_chromium
@pytest.mark.asyncio
async def test_a_classify_report_renders_every_plot_without_errors(
    serve, tiny_model: Path, tmp_path: Path, browser: Browser
) -> None:  # type: ignore[no-untyped-def]
    page = await _report(
        serve, tiny_model, tmp_path, str(MINI / "test.csv"), "--label-column", "category"
    )
    found = drawn(browser, page)
    assert set(found) == set(MARKS)
    with (MINI / "test.csv").open() as f:
        n = min(12, len({r["category"] for r in csv.DictReader(f)}))
    assert found["confusion"][0] == n * (n + 1)  # every cell, "(other)" column included
    for ident, (marks, ink) in found.items():
        assert marks > 0 and ink > 200, (ident, marks, ink)
    assert browser.errors() == []
    assert browser.requests() == [page.as_uri()]  # self-contained: nothing else fetched
    assert browser.evaluate("document.title").startswith("sidecar eval: classify")
    # The pixel check sees a plot without its marks as blank.
    emptied = tmp_path / "emptied.html"
    emptied.write_text(re.sub(r'<rect class="bar".*?</rect>', "", page.read_text()))
    assert drawn(browser, emptied)["reliability"] == (0, 0)


@needs_chromium
@pytest.mark.asyncio
async def test_an_extract_report_draws_both_curves(
    serve, tiny_model: Path, tmp_path: Path, browser: Browser
) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "x.csv"
    data.write_text('text,expected\nAnn,"{""name"": ""x""}"\nBob,"{""name"": ""Bob""}"\n')
    page = await _report(serve, tiny_model, tmp_path, str(data))
    found = drawn(browser, page)
    assert set(found) == {"reliability", "coverage"}  # no labels, no confusion
    assert found["coverage"][0] == 2  # exact match and field F1
    assert all(ink > 200 for _, ink in found.values()), found
    assert browser.errors() == []
