"""What the privacy gate costs per request (not a test: timings vary by machine).

    scripts/bench-privacy [--out bench-results/bench-privacy.json]

Times the decision scan and the client's final check for a typical Classify, and the scan
alone for 10 KB texts of several kinds and for 1 MB: median and p99 over repeated runs,
as a table and as JSON, with the CPU model (only figures from one run compare)."""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import RESULTS, cpu_model
from benchmarks.procs import run
from benchmarks.report import Col, Table, write_json
from benchmarks.stats import percentile
from sidecar.domain.types import ClassifyTask
from sidecar.router.outbound import Gate, build
from sidecar.router.privacy import Scanner

WORDS = (  # noqa: SIM905
    "the customer says their card has not arrived yet and they would like to know when "
    "it will be delivered to the address on file order 12345 on 2024-05-01 total "
    "1,234.50 EUR version 1.2.3"
).split()


def prose(n: int, rng: random.Random) -> str:
    words: list[str] = []
    size = 0
    while size < n:
        words.append(rng.choice(WORDS))
        size += len(words[-1]) + 1
    return " ".join(words)[:n]


def timed(f: Callable[[], object], runs: int) -> dict[str, float]:
    """Median and p99 of `runs` calls (after one untimed), in microseconds."""
    f()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        f()
        times.append((time.perf_counter() - t0) * 1e6)
    return {"median_us": statistics.median(times), "p99_us": percentile(times, 99), "runs": runs}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="scripts/bench-privacy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "bench-privacy.json")
    return ap


def cases(rng: random.Random) -> dict[str, Callable[[], object]]:
    scanner = Scanner()
    gate = Gate(scanner, redact=False)
    labels = ("card_arrival", "exchange_rate", "pin_blocked", "lost_card", "refund")
    task = ClassifyTask(prose(400, rng), labels, "Classify the customer's intent.")
    out = build(task, labels)
    found: dict[str, Callable[[], object]] = {
        "Classify, 400 chars + 5 labels: decision scan": lambda: gate.kinds(out),
        "Classify, 400 chars + 5 labels: final check": lambda: gate.check(out.render(), None),
    }
    texts = {
        "10 KB English prose with numbers": prose(10_000, rng),
        "10 KB with NBSPs and accents": prose(10_000, rng).replace(" ", "\u00a0").replace("e", "é"),
        "10 KB with zero-width characters": prose(10_000, rng).replace(" ", " \u200b"),
        "10 KB of numbers": " ".join(str(rng.randint(0, 10**6)) for _ in range(2000))[:10_000],
        "1 MB English prose (scanned off the event loop)": prose(1_000_000, rng),
    }
    for name, text in texts.items():
        found[name] = lambda t=text: scanner.kinds([t])  # type: ignore[misc]
    return found


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    rows = {}
    for name, f in cases(random.Random(1)).items():
        runs = 20 if name.startswith("1 MB") else 300 if name.startswith("10 KB") else 2000
        rows[name] = timed(f, runs)
    table = Table(Col(52), Col(12, ">", gap=1), Col(12, ">", gap=1))
    table.line(f"privacy scan cost on {cpu_model()}")
    table.row("case", "median", "p99")
    for name, r in rows.items():
        table.row(name, f"{r['median_us']:>9.0f} µs", f"{r['p99_us']:>9.0f} µs")
    print(table.render())
    write_json(args.out, {"cases": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
