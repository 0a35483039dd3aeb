"""Benchmarks and the soak run: scripts, not tests (timings on shared machines are noisy).

Each module is one measurement with its own command line (`python -m benchmarks.NAME --help`);
`scripts/bench*` and `scripts/soak` set up the venv and models, then run them. What they share
is written once: `common` (paths, log lines, the machine and its CPU model), `stats`
(percentiles), `report` (the table printer and the JSON writer), `procs` (child processes,
loopback ports, clean exit on Ctrl-C) and `daemon` (`sidecar serve` as a subprocess).

Not shipped in the wheel (packaging includes only `sidecar*`).
"""
