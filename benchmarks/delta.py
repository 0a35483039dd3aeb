"""Delta benchmark: sidecar's GGUF-aware deltas side by side with bsdiff4, `zstd --patch-from`,
xdelta3 and a full download, on real and synthetic model files.

    scripts/bench-delta              # every case (~15-25 minutes on 2 cores)
    scripts/bench-delta --quick      # small synthetic files only, a smoke run
    scripts/bench-delta --out PATH   # JSON elsewhere (default: bench-results/bench-delta.json)

Cases: (a) SmolLM2 with its chat template changed, (b) one tensor changed, (c) all tensors
of block 5 changed, (d) SmolLM2 -> Gemma 3 270M (unrelated files), (e) a synthetic 1 GiB
GGUF with 1% of its tensors changed, (f) the same tensors in another order, (g) sparse
edits (3% of the rows of 10% of the tensors) on SmolLM2 and on the 1 GiB file.

Every make and apply runs in its own process; its wall time and peak RSS (from GNU time)
are recorded, and every applied output is checked against the target's sha256. One run
per cell (the large files make repeats expensive); ratios are within the same run.
bsdiff4 is skipped where it would need more than --bsdiff-max-gb of memory (about 17x the
file to make); zstd is given a window that covers the old file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import CACHE, GEMMA, RESULTS, SMOL, machine
from benchmarks.procs import run
from benchmarks.report import Col, Table, write_json
from sidecar.fileio import sha256_file
from tests.gguf_variants import (
    block_changed,
    metadata_changed,
    one_tensor_changed,
    sparse_edits,
    tensors_reordered,
)

PY = sys.executable
Commands = tuple[list[str], list[str]]  # make, apply


@dataclass
class Cell:
    case: str
    tool: str
    delta_bytes: int | None
    make_s: float | None
    make_rss_mb: float | None
    apply_s: float | None
    apply_rss_mb: float | None
    ok: bool
    note: str = ""


def measure(cmd: list[str], timeout: float, work: Path) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MB, exit code of one process. GNU time reports the peak:
    ru_maxrss seen from here would include this (large) process's pre-exec fork image."""
    report = work / "rss.txt"
    t0 = time.perf_counter()
    try:
        done = subprocess.run(["/usr/bin/time", "-o", str(report), "-f", "%M", *cmd],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return timeout, 0.0, -9
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        sys.stderr.write(done.stderr.decode(errors="replace")[-2000:])
    lines = report.read_text().split() if report.exists() else []
    rss = int(lines[-1]) / 1024 if lines and lines[-1].isdigit() else 0.0
    return elapsed, rss, done.returncode


def _py(code: str, *args: Path) -> list[str]:
    return [PY, "-c", code, *map(str, args)]


_DELTA = "import sys; from pathlib import Path; from sidecar.update.delta import "
_ARGS = "(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])"


def _ours(old: Path, new: Path, d: Path, out: Path) -> Commands:
    return (_py(_DELTA + "make_delta; make_delta" + _ARGS + ")", old, new, d),
            _py(_DELTA + "apply_delta; apply_delta" + _ARGS + ")", old, d, out))  # fmt: skip


def _ours_trusted(old: Path, new: Path, d: Path, out: Path) -> Commands:
    """The daemon's apply: the base is a store blob named by its sha256, so it is not
    re-hashed first (the output's hash is still checked)."""
    make, _ = _ours(old, new, d, out)
    return make, _py(_DELTA + "apply_delta; apply_delta" + _ARGS + ", verify_base=False)", old, d, out)  # fmt: skip


def _bsdiff(old: Path, new: Path, d: Path, out: Path) -> Commands:
    return (_py("import sys, bsdiff4; bsdiff4.file_diff(*sys.argv[1:4])", old, new, d),
            _py("import sys, bsdiff4; bsdiff4.file_patch(*sys.argv[1:4])", old, out, d))  # fmt: skip


def _zstd(old: Path, new: Path, d: Path, out: Path) -> Commands:
    # The window must reach back over the whole old file (--long=31 is zstd's maximum: 2 GiB).
    # Level 19 where it finishes in minutes; level 3 for the 1 GiB files.
    level = "-19" if new.stat().st_size <= 512 << 20 else "-3"
    make = ["zstd", "-q", "-f", level, "--long=31", f"--patch-from={old}", str(new), "-o", str(d)]
    apply = ["zstd", "-q", "-f", "-d", "--long=31", "--memory=2048MB", f"--patch-from={old}",
             str(d), "-o", str(out)]  # fmt: skip
    return make, apply


def _xdelta(old: Path, new: Path, d: Path, out: Path) -> Commands:
    return (["xdelta3", "-e", "-f", "-s", str(old), str(new), str(d)],
            ["xdelta3", "-d", "-f", "-s", str(old), str(d), str(out)])  # fmt: skip


TOOLS: dict[str, Callable[[Path, Path, Path, Path], Commands]] = {
    "sidecar": _ours,
    "sidecar (daemon apply)": _ours_trusted,
    "bsdiff4": _bsdiff,
    "zstd --patch-from": _zstd,
    "xdelta3": _xdelta,
}


def skip_reason(tool: str, old: Path, new: Path, args: argparse.Namespace) -> str:
    """Why `tool` cannot run on this pair here ("" if it can)."""
    size = max(new.stat().st_size, old.stat().st_size)
    if tool == "bsdiff4" and 17 * size > args.bsdiff_max_gb * 2**30:
        return f"skipped: would need ~{17 * size / 2**30:.0f} GB to make"
    if tool == "zstd --patch-from" and old.stat().st_size > 2**31:
        return "skipped: base over 2 GiB"
    if shutil.which(TOOLS[tool](old, new, old, old)[0][0]) is None:
        return "not installed"
    return ""


def run_case(
    case: str, old: Path, new: Path, work: Path, args: argparse.Namespace, tools: list[str]
) -> list[Cell]:
    want = sha256_file(new)
    size = new.stat().st_size
    cells = [Cell(case, "full download", size, None, None, None, None, True)]
    d, out = work / "delta.bin", work / "out.bin"
    for tool in tools:
        if why := skip_reason(tool, old, new, args):
            cells.append(Cell(case, tool, None, None, None, None, None, False, why))
            continue
        d.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
        make, apply = TOOLS[tool](old, new, d, out)
        mt, mrss, mcode = measure(make, args.timeout, work)
        if mcode != 0:
            cells.append(
                Cell(case, tool, None, mt, mrss, None, None, False, f"make failed ({mcode})")
            )
            continue
        at, arss, acode = measure(apply, args.timeout, work)
        good = acode == 0 and out.exists() and sha256_file(out) == want
        cells.append(Cell(case, tool, d.stat().st_size, mt, mrss, at, arss, good,
                          "" if good else f"apply failed ({acode})"))  # fmt: skip
        print(f"  {case:28} {tool:18} {d.stat().st_size:>13,} B  make {mt:6.1f}s {mrss:7.0f}MB"
              f"  apply {at:6.1f}s {arss:6.0f}MB  {'ok' if good else 'FAILED'}", flush=True)  # fmt: skip
    d.unlink(missing_ok=True)
    out.unlink(missing_ok=True)
    return cells


def synthetic(path: Path, total: int, n_tensors: int, seed: int = 0) -> Path:
    """A GGUF of f16 tensors with random normal values (about as incompressible as real
    weights), written with the gguf package."""
    import gguf

    if path.exists() and path.stat().st_size >= total:
        return path
    rng = np.random.default_rng(seed)
    per = total // n_tensors // 2
    rows = 256
    cols = max(32, per // rows // 32 * 32)
    w = gguf.GGUFWriter(str(path) + ".partial", "llama")
    w.add_name("synthetic")
    w.add_context_length(2048)
    for i in range(n_tensors):
        w.add_tensor(
            f"blk.{i // 8}.t{i % 8}.weight", rng.standard_normal((rows, cols)).astype(np.float16)
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(str(path) + ".partial", path)
    return path


def one_percent_changed(src: Path, dst: Path) -> tuple[Path, int]:
    from tests.gguf_variants import _fresh, _matrices, layout

    shutil.copyfile(src, dst)
    lay = layout(dst)
    mats = _matrices(lay)
    changed = 0
    for t in mats[::100][: max(1, round(len(mats) / 100))]:
        _fresh(dst, lay, t)
        changed += t.nbytes
    return dst, changed


def cases(work: Path, quick: bool) -> list[tuple[str, Path, Path, int]]:
    """(name, old, new, changed tensor bytes) of each case, files made (or reused) in `work`."""
    out: list[tuple[str, Path, Path, int]] = []
    if quick:
        base = synthetic(work / "quick.gguf", 64 << 20, 64)
        new, ch = one_percent_changed(base, work / "quick-e.gguf")
        out.append(("e 1% of tensors (64 MiB)", base, new, ch))
        out.append(
            ("f reordered (64 MiB)", base, tensors_reordered(base, work / "quick-f.gguf"), 0)
        )
        return out
    out.append(("a metadata (SmolLM2)", SMOL, metadata_changed(SMOL, work / "a.gguf"), 0))
    new, ch = one_tensor_changed(SMOL, work / "b.gguf")
    out.append(("b one tensor (SmolLM2)", SMOL, new, ch))
    new, ch = block_changed(SMOL, work / "c.gguf")
    out.append(("c one block (SmolLM2)", SMOL, new, ch))
    out.append(("d SmolLM2 -> Gemma", SMOL, GEMMA, GEMMA.stat().st_size))
    new, ch = sparse_edits(SMOL, work / "g.gguf")
    out.append(("g sparse edits (SmolLM2)", SMOL, new, ch))
    big = synthetic(work / "synthetic-1g.gguf", 1 << 30, 256)
    new, ch = one_percent_changed(big, work / "e.gguf")
    out.append(("e 1% of tensors (1 GiB)", big, new, ch))
    out.append(("f reordered (1 GiB)", big, tensors_reordered(big, work / "f.gguf"), 0))
    new, ch = sparse_edits(big, work / "g1g.gguf")
    out.append(("g sparse edits (1 GiB)", big, new, ch))
    return out


def table(results: list[dict[str, Any]]) -> str:
    t = Table(Col(28), Col(18, gap=1), Col(14, ">", 1), Col(9, ">", 1), Col(7, ">", 1),
              Col(8, ">", 1), Col(8, ">", 1), Col(9, ">", 1), Col(10, ">", 1))  # fmt: skip
    t.line()
    t.row("case", "tool", "delta bytes", "% of file", "make s", "make MB", "apply s", "apply MB",
          "apply MB/s")  # fmt: skip

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for r in results:
        if r["delta_bytes"] is None:
            t.row(r["case"], r["tool"], tail=" " + r["note"])
            continue
        pct = 100 * r["delta_bytes"] / r["target_bytes"]
        rate = r["target_bytes"] / 1e6 / r["apply_s"] if r["apply_s"] else None
        t.row(r["case"], r["tool"], f"{r['delta_bytes']:,}", f"{pct:.3f}%",
              fmt(r["make_s"], ".1f"), fmt(r["make_rss_mb"], ".0f"), fmt(r["apply_s"], ".1f"),
              fmt(r["apply_rss_mb"], ".0f"), fmt(rate, ".0f"),
              tail="" if r["ok"] else "  " + r["note"])  # fmt: skip
    return t.render()


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="scripts/bench-delta",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench-delta.json")
    ap.add_argument("--bsdiff-max-gb", type=float, default=8.0)
    ap.add_argument("--timeout", type=float, default=1200.0)
    ap.add_argument("--only", default="", help="comma-separated case letters (e.g. f,e) to run")
    ap.add_argument("--tools", default="", help="comma-separated tool names to run")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    work = CACHE / "bench-delta"
    work.mkdir(parents=True, exist_ok=True)
    todo = cases(work, args.quick)
    if args.only:
        wanted = set(args.only.split(","))
        todo = [c for c in todo if c[0].split()[0] in wanted]
    tools = [t for t in TOOLS if not args.tools or t in args.tools.split(",")]
    results: list[dict[str, Any]] = []
    for name, old, new, changed in todo:
        print(f"{name}: {old.name} -> {new.name} ({new.stat().st_size:,} bytes)", flush=True)
        for c in run_case(name, old, new, work, args, tools):
            results.append(
                asdict(c) | {"target_bytes": new.stat().st_size, "changed_bytes": changed}
            )
    print(table(results))
    write_json(args.out, {"machine": machine(), "results": results}, indent=1)
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
