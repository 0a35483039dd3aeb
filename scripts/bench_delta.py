"""Delta benchmark: sidecar's GGUF-aware deltas side by side with bsdiff4, `zstd --patch-from`,
xdelta3 and a full download, on real and synthetic model files.

    scripts/bench-delta              # every case (~15-25 minutes on 2 cores)
    scripts/bench-delta --quick      # small synthetic files only, a smoke run
    scripts/bench-delta --out PATH   # JSON elsewhere (default: bench-results/bench-delta.json)

Cases: (a) SmolLM2 with its chat template changed, (b) one tensor changed, (c) all tensors
of block 5 changed, (d) SmolLM2 -> Gemma 3 270M (unrelated files), (e) a synthetic 1 GiB
GGUF with 1% of its tensors changed, (f) the same tensors in another order, (g) sparse
edits (3% of the rows of 10% of the tensors) on SmolLM2 and on the 1 GiB file.

Every make and apply runs in its own process; its wall time and peak RSS (from wait4)
are recorded, and every applied output is checked against the target's sha256. One run
per cell (the large files make repeats expensive); ratios are within the same run.
bsdiff4 is skipped where it would need more than --bsdiff-max-gb of memory (about 17x the
file to make); zstd is given a window that covers the old file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from gguf_variants import (  # noqa: E402
    block_changed,
    metadata_changed,
    one_tensor_changed,
    sparse_edits,
    tensors_reordered,
)

CACHE = Path(os.environ.get("SIDECAR_CACHE") or Path.home() / ".cache" / "sidecar")
MODELS = CACHE / "models"
PY = sys.executable


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


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


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


def _ours(old: Path, new: Path, d: Path, out: Path) -> tuple[list[str], list[str]]:
    make = [PY, "-c", "import sys; from pathlib import Path; from sidecar.update.delta import make_delta; "
            "make_delta(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))", str(old), str(new), str(d)]  # fmt: skip
    apply = [PY, "-c", "import sys; from pathlib import Path; from sidecar.update.delta import apply_delta; "
             "apply_delta(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))", str(old), str(d), str(out)]  # fmt: skip
    return make, apply


def _ours_trusted(old: Path, new: Path, d: Path, out: Path) -> tuple[list[str], list[str]]:
    """The daemon's apply: the base is a store blob named by its sha256, so it is not
    re-hashed first (the output's hash is still checked)."""
    make, _ = _ours(old, new, d, out)
    apply = [PY, "-c", "import sys; from pathlib import Path; from sidecar.update.delta import apply_delta; "
             "apply_delta(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), verify_base=False)",
             str(old), str(d), str(out)]  # fmt: skip
    return make, apply


def _bsdiff(old: Path, new: Path, d: Path, out: Path) -> tuple[list[str], list[str]]:
    make = [
        PY,
        "-c",
        "import sys, bsdiff4; bsdiff4.file_diff(*sys.argv[1:4])",
        str(old),
        str(new),
        str(d),
    ]
    apply = [
        PY,
        "-c",
        "import sys, bsdiff4; bsdiff4.file_patch(*sys.argv[1:4])",
        str(old),
        str(out),
        str(d),
    ]
    return make, apply


def _zstd(old: Path, new: Path, d: Path, out: Path) -> tuple[list[str], list[str]]:
    # The window must reach back over the whole old file (--long=31 is zstd's maximum: 2 GiB).
    # Level 19 where it finishes in minutes; level 3 for the 1 GiB files.
    level = "-19" if new.stat().st_size <= 512 << 20 else "-3"
    make = ["zstd", "-q", "-f", level, "--long=31", f"--patch-from={old}", str(new), "-o", str(d)]
    apply = [
        "zstd",
        "-q",
        "-f",
        "-d",
        "--long=31",
        "--memory=2048MB",
        f"--patch-from={old}",
        str(d),
        "-o",
        str(out),
    ]
    return make, apply


def _xdelta(old: Path, new: Path, d: Path, out: Path) -> tuple[list[str], list[str]]:
    return (["xdelta3", "-e", "-f", "-s", str(old), str(new), str(d)],
            ["xdelta3", "-d", "-f", "-s", str(old), str(d), str(out)])  # fmt: skip


TOOLS = {
    "sidecar": _ours,
    "sidecar (daemon apply)": _ours_trusted,
    "bsdiff4": _bsdiff,
    "zstd --patch-from": _zstd,
    "xdelta3": _xdelta,
}


def run_case(case: str, old: Path, new: Path, work: Path, args: argparse.Namespace) -> list[Cell]:
    want = sha(new)
    size = new.stat().st_size
    cells = [Cell(case, "full download", size, None, None, None, None, True)]
    for tool, cmds in TOOLS.items():
        if tool == "bsdiff4" and 17 * max(size, old.stat().st_size) > args.bsdiff_max_gb * 2**30:
            need = 17 * max(size, old.stat().st_size) / 2**30
            cells.append(Cell(case, tool, None, None, None, None, None, False,
                              f"skipped: would need ~{need:.0f} GB to make"))  # fmt: skip
            continue
        if tool == "zstd --patch-from" and old.stat().st_size > 2**31:
            cells.append(
                Cell(case, tool, None, None, None, None, None, False, "skipped: base over 2 GiB")
            )
            continue
        if shutil.which(cmds(old, new, work / "d", work / "o")[0][0]) is None:
            cells.append(Cell(case, tool, None, None, None, None, None, False, "not installed"))
            continue
        d, out = work / "delta.bin", work / "out.bin"
        d.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
        make, apply = cmds(old, new, d, out)
        mt, mrss, mcode = measure(make, args.timeout, work)
        if mcode != 0:
            cells.append(
                Cell(case, tool, None, mt, mrss, None, None, False, f"make failed ({mcode})")
            )
            continue
        at, arss, acode = measure(apply, args.timeout, work)
        good = acode == 0 and out.exists() and sha(out) == want
        cells.append(Cell(case, tool, d.stat().st_size, mt, mrss, at, arss, good,
                          "" if good else f"apply failed ({acode})"))  # fmt: skip
        print(f"  {case:28} {tool:18} {d.stat().st_size:>13,} B  make {mt:6.1f}s {mrss:7.0f}MB"
              f"  apply {at:6.1f}s {arss:6.0f}MB  {'ok' if good else 'FAILED'}", flush=True)  # fmt: skip
    d = work / "delta.bin"
    d.unlink(missing_ok=True)
    (work / "out.bin").unlink(missing_ok=True)
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
    from gguf_variants import _fresh, _matrices, layout

    shutil.copyfile(src, dst)
    lay = layout(dst)
    mats = _matrices(lay)
    changed = 0
    for t in mats[::100][: max(1, round(len(mats) / 100))]:
        _fresh(dst, lay, t)
        changed += t.nbytes
    return dst, changed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "bench-delta.json")
    ap.add_argument("--bsdiff-max-gb", type=float, default=8.0)
    ap.add_argument("--timeout", type=float, default=1200.0)
    ap.add_argument("--only", default="", help="comma-separated case letters (e.g. f,e) to run")
    ap.add_argument("--tools", default="", help="comma-separated tool names to run")
    args = ap.parse_args()
    work = CACHE / "bench-delta"
    work.mkdir(parents=True, exist_ok=True)
    smol, gemma = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf", MODELS / "gemma-3-270m-q4_k_m.gguf"

    cases: list[tuple[str, Path, Path, int]] = []  # name, old, new, changed tensor bytes
    if args.quick:
        base = synthetic(work / "quick.gguf", 64 << 20, 64)
        new, ch = one_percent_changed(base, work / "quick-e.gguf")
        cases.append(("e 1% of tensors (64 MiB)", base, new, ch))
        cases.append(
            ("f reordered (64 MiB)", base, tensors_reordered(base, work / "quick-f.gguf"), 0)
        )
    else:
        cases.append(("a metadata (SmolLM2)", smol, metadata_changed(smol, work / "a.gguf"), 0))
        new, ch = one_tensor_changed(smol, work / "b.gguf")
        cases.append(("b one tensor (SmolLM2)", smol, new, ch))
        new, ch = block_changed(smol, work / "c.gguf")
        cases.append(("c one block (SmolLM2)", smol, new, ch))
        cases.append(("d SmolLM2 -> Gemma", smol, gemma, gemma.stat().st_size))
        new, ch = sparse_edits(smol, work / "g.gguf")
        cases.append(("g sparse edits (SmolLM2)", smol, new, ch))
        big = synthetic(work / "synthetic-1g.gguf", 1 << 30, 256)
        new, ch = one_percent_changed(big, work / "e.gguf")
        cases.append(("e 1% of tensors (1 GiB)", big, new, ch))
        cases.append(("f reordered (1 GiB)", big, tensors_reordered(big, work / "f.gguf"), 0))
        new, ch = sparse_edits(big, work / "g1g.gguf")
        cases.append(("g sparse edits (1 GiB)", big, new, ch))

    if args.only:
        wanted = set(args.only.split(","))
        cases = [c for c in cases if c[0].split()[0] in wanted]
    if args.tools:
        keep = set(args.tools.split(","))
        for t in list(TOOLS):
            if t not in keep:
                del TOOLS[t]
    results: list[dict[str, object]] = []
    for name, old, new, changed in cases:
        print(f"{name}: {old.name} -> {new.name} ({new.stat().st_size:,} bytes)", flush=True)
        for c in run_case(name, old, new, work, args):
            results.append(
                asdict(c) | {"target_bytes": new.stat().st_size, "changed_bytes": changed}
            )

    print()
    print(f"{'case':28} {'tool':18} {'delta bytes':>14} {'% of file':>9} {'make s':>7} {'make MB':>8} "
          f"{'apply s':>8} {'apply MB':>9} {'apply MB/s':>10}")  # fmt: skip
    for r in results:
        if r["delta_bytes"] is None:
            print(f"{r['case']:28} {r['tool']:18} {r['note']}")
            continue
        pct = 100 * int(r["delta_bytes"]) / int(r["target_bytes"])  # type: ignore[call-overload]
        rate = int(r["target_bytes"]) / 1e6 / float(r["apply_s"]) if r["apply_s"] else None  # type: ignore[call-overload, arg-type]
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        print(f"{r['case']:28} {r['tool']:18} {int(r['delta_bytes']):>14,} {pct:>8.3f}% "  # type: ignore[call-overload]
              f"{fmt(r['make_s'], '7.1f')} {fmt(r['make_rss_mb'], '8.0f')} {fmt(r['apply_s'], '8.1f')} "
              f"{fmt(r['apply_rss_mb'], '9.0f')} {fmt(rate, '10.0f')}{'' if r['ok'] else '  ' + str(r['note'])}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.node(), "cpus": os.cpu_count(),
                                    "results": results}, indent=1))  # fmt: skip
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
