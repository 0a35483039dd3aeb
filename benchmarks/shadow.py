"""Shadow traffic benchmark: what `cloud.shadow_rate` costs the local reply (it should cost
nothing: the shadow call starts after the reply and is never awaited by it).

    scripts/bench-shadow                    # 400 calls per daemon, cloud latency 100 ms
    scripts/bench-shadow --calls 100        # a quick look
    scripts/bench-shadow --cloud-ms 500     # a slower cloud

Two real daemon processes on the fake engine (`FakeSlot`: an answer in microseconds, so a
call's latency is all daemon and transport, where any cost of the shadow work would show),
both with a cloud: a loopback OpenAI-compatible server in this process that holds every
answer `--cloud-ms` and then agrees. One has `shadow_rate = 0`, the other `1.0`. Classify
calls (AUTO, threshold 0 so every answer stays local) go to the two in turn, one in flight,
paced so that each daemon's shadow calls overlap the next calls (at most 2 in flight, as
the daemon allows) and the cloud's answers arrive while calls are being measured. Latency
is the client's round trip; the shadow daemon's status says how many calls it made and
dropped, so the run shows that shadow traffic really ran beside the calls it measured.
"""

from __future__ import annotations

import argparse
import http.server
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, SMOL, Log, loadavg, machine
from benchmarks.procs import Children
from benchmarks.report import Col, Table, write_json
from benchmarks.stats import dist
from benchmarks.transport import SERVE, Target
from sidecar.client import Client

LABELS = ("billing", "refund", "shipping")
TEXT = "where is my parcel"
WARMUP = 30

log = Log("bench-shadow")


@contextmanager
def slow_cloud(delay_s: float) -> Iterator[tuple[str, list[int]]]:
    """A loopback Chat Completions server that answers "billing" after `delay_s`; yields
    its base URL and a one-item list counting the requests it received."""
    seen = [0]
    body = json.dumps({
        "id": "x", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "billing"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21},
    }).encode()  # fmt: skip

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen[0] += 1
            time.sleep(delay_s)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    finally:
        server.shutdown()
        server.server_close()


def config_text(model: Path, url: str, rate: float) -> str:
    return f"""
[models.fake]
path = "{model}"
workers = 1

[cloud]
base_url = "{url}"
model = "m"
retries = 0
classify_threshold = 0.0
shadow_rate = {rate}
"""


def start(
    children: Children, tmp: Path, name: str, model: Path, url: str, rate: float,
    root: Path | None = None,
) -> Target:  # fmt: skip
    """A daemon on the fake engine, from this tree's code or `root`'s (another checkout)."""
    config = tmp / f"{name}.toml"
    config.write_text(config_text(model, url, rate))
    sock = tmp / f"{name}.sock"
    here = root or Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-c", SERVE, str(here), str(config), str(sock), str(tmp / f"st-{name}")]
    return Target(children, name, cmd, sock, tmp / f"{name}.log")


def measure(clients: dict[str, Client], calls: int, pace_s: float) -> dict[str, list[float]]:
    """Calls to each daemon in turn, one in flight, a random time apart (exponential, mean
    `pace_s`: Poisson arrivals, so calls do not fall in step with the shadow calls); ms per
    call."""
    draw = random.Random(17)
    out: dict[str, list[float]] = {name: [] for name in clients}
    for i in range(WARMUP + calls):
        for name, c in clients.items():
            t0 = time.perf_counter()
            reply = c.classify(TEXT, LABELS, routing="AUTO")
            ms = (time.perf_counter() - t0) * 1e3
            assert reply.route.served_by == "local", reply.route
            if i >= WARMUP:
                out[name].append(ms)
            time.sleep(draw.expovariate(1 / pace_s))
    return out


def render(r: dict[str, Any]) -> str:
    t = Table(Col(18), Col(8, ">", 2), Col(10, ">", 2), Col(10, ">", 2), Col(10, ">", 2))
    t.line(f"Shadow traffic overhead: {r['calls']} Classify calls per daemon, cloud answers "
           f"in {r['cloud_ms']} ms, one call in flight every {r['pace_ms']} ms, "
           f"{r['hogs']} busy-looping process(es) beside")  # fmt: skip
    t.row("shadow_rate", "calls", "p50 ms", "p99 ms", "mean ms")
    t.rule()
    for name, d in r["latency_ms"].items():
        t.row(name, d["n"], d["p50"], d["p99"], d["mean"])
    t.line(f"shadow daemon: {r['shadow_counts']}; the cloud received {r['cloud_received']}")
    t.line(f"daemon CPU per call (ms, shadow work included): {r['daemon_cpu_ms_per_call']}")
    return t.render()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--cloud-ms", type=float, default=100.0)
    ap.add_argument("--model", type=Path, default=SMOL,
                    help="any GGUF file (the fake engine never loads it)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=RESULTS / "bench-shadow.json")
    ap.add_argument("--baseline", type=Path,
                    help="another checkout: its daemon at rate 1.0 is called in the same turns")  # fmt: skip
    ap.add_argument("--hogs", type=int, default=0,
                    help="busy-looping processes beside (a loaded machine, where the tail shows)")  # fmt: skip
    a = ap.parse_args(argv)
    if not a.model.is_file():
        log(f"{a.model} is missing: run ./scripts/setup, or pass --model with any GGUF file")
        return 2
    # Each daemon gets a call every 2 * pace: at most 2 shadow calls of cloud_ms in flight
    # means one may start every cloud_ms / 2, so this pace shadows (nearly) every call.
    pace_s = a.cloud_ms / 1e3 / 4
    tmp = Path(tempfile.mkdtemp(prefix="bsh-", dir="/tmp"))
    results: dict[str, Any] = {"calls": a.calls, "cloud_ms": a.cloud_ms,
                               "pace_ms": round(pace_s * 1e3, 1), "machine": machine(), "hogs": a.hogs,
                               "load_before": loadavg()}  # fmt: skip
    try:
        with slow_cloud(a.cloud_ms / 1e3) as (url, seen), Children() as children:
            targets = {"0": start(children, tmp, "rate0", a.model, url, 0.0),
                       "1.0": start(children, tmp, "rate1", a.model, url, 1.0)}  # fmt: skip
            if a.baseline is not None:
                targets["1.0 baseline"] = start(children, tmp, "base1", a.model, url, 1.0,
                                                a.baseline.resolve())  # fmt: skip
            for t in targets.values():
                t.wait_ready()
            for _ in range(a.hogs):
                children.spawn([sys.executable, "-c", "while True: pass"])
            clients = {name: Client(t.socket, timeout=30) for name, t in targets.items()}
            log(f"measuring {a.calls} calls per daemon")
            cpu0 = {name: t.cpu() for name, t in targets.items()}
            lat = measure(clients, a.calls, pace_s)
            time.sleep(a.cloud_ms / 1e3 * 2)  # the last shadow calls end
            results["shadow_counts"] = {
                name: dict(c.status().cloud.shadow.counts) for name, c in clients.items()
                if name != "0"
            }  # fmt: skip
            results["cloud_received"] = seen[0]
            results["latency_ms"] = {name: dist(xs, 3) for name, xs in lat.items()}
            n = WARMUP + a.calls
            results["daemon_cpu_ms_per_call"] = {
                name: round((t.cpu() - cpu0[name]) / n * 1e3, 2) for name, t in targets.items()
            }
            for c in clients.values():
                c.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["load_after"] = loadavg()
    print(render(results))
    write_json(a.out, results)
    log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
