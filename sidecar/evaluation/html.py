"""The eval report as one self-contained HTML page: the figures, and the plots drawn here
as inline SVG (a reliability diagram, the coverage-accuracy curve, a heat map of the most
confused labels). No script, no stylesheet or font from anywhere: it opens offline, from a
mail attachment or a CI artifact, and renders the same everywhere."""

from __future__ import annotations

from html import escape
from typing import Any

from sidecar.evaluation.summary import table

W, H, PAD = 360, 300, 44  # plot size and the margin for axes
BLUE, GREY, RED, GREEN = "#2b6cb0", "#a0aec0", "#c53030", "#2f855a"


def _x(v: float) -> float:
    return PAD + v * (W - PAD - 12)


def _y(v: float) -> float:
    return H - PAD - v * (H - PAD - 12)


def _axes(xlabel: str, ylabel: str, lo: float = 0.0, hi: float = 1.0) -> list[str]:
    out = [f'<rect x="{PAD}" y="12" width="{W - PAD - 12}" height="{H - PAD - 12}" '
           'fill="#fff" stroke="#4a5568"/>']  # fmt: skip
    for k in range(6):
        t = k / 5
        value = lo + t * (hi - lo)
        out.append(f'<line x1="{_x(t):.1f}" y1="{H - PAD}" x2="{_x(t):.1f}" y2="{H - PAD + 4}" stroke="#4a5568"/>'
                   f'<text x="{_x(t):.1f}" y="{H - PAD + 16}" text-anchor="middle">{value:.1f}</text>'
                   f'<line x1="{PAD - 4}" y1="{_y(t):.1f}" x2="{PAD}" y2="{_y(t):.1f}" stroke="#4a5568"/>'
                   f'<text x="{PAD - 6}" y="{_y(t) + 4:.1f}" text-anchor="end">{t:.1f}</text>')  # fmt: skip
    out.append(f'<text x="{_x(0.5):.1f}" y="{H - 6}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text transform="translate(12 {_y(0.5):.1f}) rotate(-90)" '
               f'text-anchor="middle">{escape(ylabel)}</text>')  # fmt: skip
    return out


def _svg(ident: str, title: str, body: list[str], width: int = W, height: int = H) -> str:
    return (f'<figure><figcaption>{escape(title)}</figcaption><svg id="{ident}" class="plot" '
            f'xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">{"".join(body)}</svg></figure>')  # fmt: skip


def reliability(c: dict[str, Any]) -> str:
    """Accuracy against confidence per bin: bars on the diagonal are calibrated."""
    body = _axes("confidence" + (" (exp mean logprob)" if c["unit"] != "probability" else ""),
                 "accuracy")  # fmt: skip
    body.append(f'<line x1="{_x(0)}" y1="{_y(0)}" x2="{_x(1)}" y2="{_y(1)}" stroke="{GREY}" '
                'stroke-dasharray="4 3"/>')  # fmt: skip
    for b in c["reliability"]:
        x0, x1 = _x(b["lo"]) + 1, _x(b["hi"]) - 1
        acc = b["accuracy"]
        body.append(f'<rect class="bar" x="{x0:.1f}" y="{_y(acc):.1f}" width="{x1 - x0:.1f}" '
                    f'height="{_y(0) - _y(acc):.1f}" fill="{BLUE}" fill-opacity="0.75">'
                    f'<title>{b["count"]} rows, confidence {b["confidence"]:.3f}, accuracy '
                    f'{acc:.3f}</title></rect>')  # fmt: skip
    return _svg("reliability", f"Reliability (ECE {_n(c['ece'])})", body)


def coverage(c: dict[str, Any]) -> str:
    """Accuracy of what is kept local against the share kept, surest first."""
    body = _axes("share kept local (surest first)", "accuracy of what is kept")
    for key, colour in (("accuracy", BLUE), ("field_f1", GREY)):
        pts = [(p["coverage"], p[key]) for p in c["curve"] if p.get(key) is not None]
        if pts:
            line = " ".join(f"{_x(x):.1f},{_y(y):.1f}" for x, y in pts)
            body.append(f'<polyline class="curve" points="{line}" fill="none" stroke="{colour}" '
                        'stroke-width="2"/>')  # fmt: skip
    t = c["at_threshold"]
    if t["coverage"] is not None and t["accuracy"] is not None:
        body.append(f'<circle class="mark" cx="{_x(t["coverage"]):.1f}" cy="{_y(t["accuracy"]):.1f}" '
                    f'r="5" fill="{RED}"><title>threshold {t["threshold"]:.4g} ({escape(t["source"])}): '
                    f'{t["coverage"]:.3f} kept at {t["accuracy"]:.3f}</title></circle>')  # fmt: skip
    f = c.get("fitted")
    if f and f["reached"]:
        body.append(f'<circle class="mark fitted" cx="{_x(f["coverage"]):.1f}" cy="{_y(f["accuracy"]):.1f}" '
                    f'r="5" fill="{GREEN}"><title>fitted for accuracy {f["target"]:g}: threshold '
                    f'{f["threshold"]:.4g} keeps {f["coverage"]:.3f} at {f["accuracy"]:.3f}</title></circle>')  # fmt: skip
    return _svg("coverage", f"Coverage and accuracy (AUROC {_n(c['auroc'])})", body)


def confusion(m: dict[str, Any]) -> str:
    """Rows: the right label; columns: the answer; shade: the share of the row."""
    labels: list[str] = m["labels"]
    cell, left, top = 26, 170, 130
    n = len(labels)
    width, height = left + (n + 1) * cell + 10, top + n * cell + 10
    body = []
    for j, name in enumerate([*labels, "(other)"]):
        x = left + j * cell + cell / 2
        body.append(
            f'<text transform="translate({x:.0f} {top - 6}) rotate(-60)">{escape(name[:24])}</text>'
        )
    for i, name in enumerate(labels):
        y = top + i * cell
        body.append(
            f'<text x="{left - 6}" y="{y + cell * 0.65:.0f}" text-anchor="end">{escape(name[:24])}</text>'
        )
        total = sum(m["matrix"][i]) or 1
        for j, count in enumerate(m["matrix"][i]):
            share = count / total
            colour = BLUE if i == j else RED
            body.append(f'<rect class="cell" x="{left + j * cell}" y="{y}" width="{cell - 1}" '
                        f'height="{cell - 1}" fill="{colour}" fill-opacity="{0.08 + 0.92 * share:.2f}">'
                        f'<title>{escape(name)} -> {escape(([*labels, "(other)"])[j])}: {count}</title></rect>')  # fmt: skip
            if count:
                body.append(f'<text x="{left + j * cell + cell / 2:.0f}" y="{y + cell * 0.65:.0f}" '
                            f'text-anchor="middle">{count}</text>')  # fmt: skip
    return _svg("confusion", "Confusion among the most confused labels", body, width, height)


def _n(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


STYLE = """body{font:14px system-ui,sans-serif;margin:24px;color:#1a202c}
pre{background:#f7fafc;padding:12px;overflow:auto}figure{display:inline-block;margin:0 16px 16px 0}
figcaption{font-weight:600;margin-bottom:4px}svg text{font:11px sans-serif;fill:#2d3748}"""


def render(report: dict[str, Any]) -> str:
    """The whole page."""
    c = report["confidence"]
    plots = [reliability(c), coverage(c)]
    if "confusion" in report:
        plots.append(confusion(report["confusion"]))
    title = f"sidecar eval: {report['kind']} of {report['source']}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"
        f"<pre>{escape(table(report))}</pre>{''.join(plots)}</body></html>\n"
    )
