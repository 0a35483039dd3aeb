"""Progress of `sidecar update apply`: a live bar on a terminal, plain periodic lines elsewhere."""

from __future__ import annotations

import io

from sidecar.cli.progress import EVERY_S, ProgressDisplay


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def screen(output: str) -> list[str]:
    """What a terminal shows for `output`: a carriage return goes back to the line's start
    and overwrites, it does not clear."""
    lines: list[list[str]] = [[]]
    col = 0
    for ch in output:
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append([])
            col = 0
        else:
            line = lines[-1]
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
    return ["".join(x).rstrip() for x in lines if "".join(x).strip()]


def test_off_a_terminal_progress_is_plain_lines_every_tenth() -> None:
    out = io.StringIO()
    p = ProgressDisplay(out, clock=lambda: 0.0)
    for done in range(0, 1_000_001, 1000):
        p.show("rebuilding", "", done, 1_000_000)
    p.end()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 10 <= len(lines) <= 12, lines  # 0%, 10%, ... 100%
    assert lines[0].startswith("rebuilding:") and "100%" in lines[-1]


def test_off_a_terminal_a_slow_stage_still_says_something_every_few_seconds() -> None:
    out = io.StringIO()
    now = [0.0]
    p = ProgressDisplay(out, clock=lambda: now[0])
    for done in range(5):  # 0.5 % per step: never another tenth
        p.show("fetching", "", done * 5000, 1_000_000)
        now[0] += EVERY_S
    assert len(out.getvalue().splitlines()) == 5


def test_on_a_terminal_a_shorter_line_leaves_nothing_of_a_longer_one() -> None:
    term = Terminal()
    p = ProgressDisplay(term)
    p.show("fetching", "from https://updates.example.com/very/long/path/model.gguf", 10, 10**9)
    p.show("fetching", "", 10**9, 10**9)
    p.end()
    p.show("rebuilding", "", 5, 10)
    p.end()
    shown = screen(term.getvalue())
    assert len(shown) == 2, shown
    assert shown[0].startswith("fetching") and "example.com" not in shown[0]
    assert shown[1].startswith("rebuilding")
