"""Transport benchmark: what the daemon adds around a request, beside the engine's own time.

    scripts/bench-transport                      # 400 calls per row
    scripts/bench-transport --calls 100          # a quick look
    scripts/bench-transport --before DIR         # also daemons from another checkout (a git
                                                 # worktree of the old commit), same run
    scripts/bench-transport --out PATH           # JSON elsewhere (default bench-results/bench-transport.json)

A real daemon process (the composition root, logging as `sidecar serve` logs) runs on the
fake engine (`FakeSlot`: no llama.cpp, an answer in microseconds), so nearly all of a call's
time is transport: the client, gRPC, the peer-credential relay, the interceptor (auth, error
mapping, the request log line and metrics), the servicer's conversions, the router and the
pool's queue. Each call's overhead is its round trip at the client minus the daemon's own
`timings.total_ms` (queue + engine) from the reply; for a stream, the time to the last chunk
minus the summary's total.

Targets: the daemon with the peer-credential relay (the default), one without
(`server.peer_credentials = false`), so the relay's share shows as a difference, and a bare
gRPC aio server whose handlers return a constant reply: the floor that gRPC Python itself
sets on this machine. Rows: Generate, Classify (unary) and GenerateStream (4 chunks), from
the sync client (`sidecar.client.Client`) and from a raw gRPC stub. Calls are sequential
(one in flight) and the rows are taken in turn, call by call, so a burst of foreign load
falls on all of them alike: compare rows within one run. Per target, the CPU its process
used per call (all its threads) is reported too: it is less disturbed by a busy machine
than latency is.

On a busy machine each hop between threads or processes on a call's path waits for the
scheduler, so the relay (one more hop each way) costs more there than its CPU suggests.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import grpc
import psutil

from benchmarks.common import RESULTS, SMOL, Log, loadavg, machine
from benchmarks.daemon import READY, clean_env
from benchmarks.procs import Children
from benchmarks.report import Col, Table, write_json
from benchmarks.stats import dist
from sidecar.client import Client
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc as pb_grpc

TARGET_P50_MS = 1.0
WARMUP = 50
LABELS = ("billing", "refund", "shipping")
FLOOR = "grpc floor"

log = Log("bench-transport")

Call = Callable[[], float]  # one call; returns the daemon's own total ms

# The daemon on the fake engine, as `sidecar serve` runs it, from the checkout at argv[1].
SERVE = """
import asyncio, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from sidecar.app import serve
from sidecar.config import Overrides, load
from sidecar.logs import configure
cfg = load(Overrides(config=Path(sys.argv[2]), socket=Path(sys.argv[3]),
                     store=Path(sys.argv[4])), env={})
configure(cfg.log.level, cfg.log.format)
sys.exit(asyncio.run(serve(cfg, "fake")))
"""


def config_text(model: Path, relay: bool) -> str:
    return f"""
[server]
peer_credentials = {"true" if relay else "false"}

[models.fake]
path = "{model}"
workers = 1
"""


class Target:
    """A server process to measure, on its own socket."""

    def __init__(self, children: Children, name: str, cmd: list[str], sock: Path,
                 logfile: Path) -> None:  # fmt: skip
        self.name, self.socket, self.logfile = name, sock, logfile
        self.proc = children.spawn(cmd, logfile, clean_env())
        self.calls = 0
        self.cpu_s = 0.0
        self._ps = psutil.Process(self.proc.pid)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.logfile.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{tail}")
            if self.socket.exists():
                with Client(self.socket, timeout=2) as c, suppress(grpc.RpcError):
                    if c.health(READY) == "SERVING":
                        return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not SERVING in time")

    def cpu(self) -> float:
        t = self._ps.cpu_times()
        return float(t.user + t.system)


def daemon(children: Children, tmp: Path, name: str, src: Path, model: Path,
           relay: bool) -> Target:  # fmt: skip
    tag = name.replace(" ", "-").replace("@", "-")
    config = tmp / f"{tag}.toml"
    config.write_text(config_text(model, relay))
    sock = tmp / f"{tag}.sock"
    cmd = [sys.executable, "-c", SERVE, str(src), str(config), str(sock), str(tmp / f"st-{tag}")]
    return Target(children, name, cmd, sock, tmp / f"{tag}.log")


# ------------------------------------------------------------------ the floor


class FloorServicer(pb_grpc.InferenceServicer):
    """Constant replies: what a call costs with nothing of the daemon in it."""

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateReply:
        return pb.GenerateReply(text="hello ")

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: Any
    ) -> Any:  # an async generator of chunks
        for word in request.prompt.split()[: request.max_tokens]:
            yield pb.GenerateChunk(text=word + " ")
        yield pb.GenerateChunk(summary=pb.GenerateReply(text=request.prompt))

    async def Classify(self, request: pb.ClassifyRequest, context: Any) -> pb.ClassifyReply:
        return pb.ClassifyReply(label=request.labels[0])


async def serve_floor(sock: Path) -> None:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_InferenceServicer_to_server(FloorServicer(), server)  # type: ignore[no-untyped-call]
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    server.add_insecure_port(f"unix:{sock}")
    await server.start()
    await checks.set(READY, health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


# ------------------------------------------------------------------ calls


def sync_calls(c: Client) -> dict[str, Call]:
    def generate() -> float:
        return float(c.generate("hello there", max_tokens=1).timings.total_ms)

    def classify() -> float:
        return float(c.classify("where is my parcel", LABELS).timings.total_ms)

    def stream() -> float:
        last = None
        for chunk in c.generate_stream("one two three four", max_tokens=4):
            last = chunk
        assert last is not None and last.HasField("summary")
        return float(last.summary.timings.total_ms)

    return {"Generate": generate, "Classify": classify, "GenerateStream": stream}


def raw_calls(stub: pb_grpc.InferenceStub) -> dict[str, Call]:
    gen = pb.GenerateRequest(prompt="hello there", max_tokens=1)
    cls = pb.ClassifyRequest(text="where is my parcel", labels=LABELS)
    streamed = pb.GenerateRequest(prompt="one two three four", max_tokens=4)

    def generate() -> float:
        return float(stub.Generate(gen, timeout=30).timings.total_ms)

    def classify() -> float:
        return float(stub.Classify(cls, timeout=30).timings.total_ms)

    def stream() -> float:
        last = None
        for chunk in stub.GenerateStream(streamed, timeout=30):
            last = chunk
        assert last is not None
        return float(last.summary.timings.total_ms)

    return {"Generate": generate, "Classify": classify, "GenerateStream": stream}


class Row:
    """One (target, client, rpc): its call and the samples taken so far."""

    def __init__(self, target: Target, name: str, call: Call) -> None:
        self.target, self.name, self.call = target, name, call
        self.rtt: list[float] = []
        self.over: list[float] = []

    def sample(self) -> None:
        t0 = time.perf_counter()
        daemon_ms = self.call()
        ms = (time.perf_counter() - t0) * 1000
        self.rtt.append(ms)
        self.over.append(ms - daemon_ms)

    def summary(self) -> dict[str, Any]:
        return {"round_trip_ms": dist(self.rtt, 3), "overhead_ms": dist(self.over, 3)}


def rows_for(target: Target, stack: ExitStack) -> Iterator[Row]:
    c = stack.enter_context(Client(target.socket, timeout=30))
    ch = stack.enter_context(grpc.insecure_channel(f"unix:{target.socket}"))
    for rpc, call in sync_calls(c).items():
        yield Row(target, f"client {rpc}", call)
    for rpc, call in raw_calls(pb_grpc.InferenceStub(ch)).items():  # type: ignore[no-untyped-call]
        yield Row(target, f"raw stub {rpc}", call)


def measure(rows: list[Row], n: int) -> None:
    """`n` samples per row, the rows taken in turn (in a new random order each round: no
    row always follows the same one); each target's CPU counted around its own calls."""
    for row in rows:
        for _ in range(WARMUP):
            row.call()
    order = random.Random(0)
    for _ in range(n):
        for row in order.sample(rows, len(rows)):
            before = row.target.cpu()
            row.sample()
            row.target.cpu_s += row.target.cpu() - before
            row.target.calls += 1


# ------------------------------------------------------------------ report


def render(results: dict[str, Any]) -> str:
    t = Table(Col(15), Col(24), Col(9, ">"), Col(9, ">"), Col(10, ">", 2), Col(10, ">"))
    t.row("target", "client / rpc", "rtt p50", "rtt p99", "over p50", "over p99")
    t.rule()
    for name, target in results["targets"].items():
        for row, r in target["rows"].items():
            rt, ov = r["round_trip_ms"], r["overhead_ms"]
            t.row(name, row, f"{rt['p50']:.3f}", f"{rt['p99']:.3f}", f"{ov['p50']:.3f}",
                  f"{ov['p99']:.3f}")  # fmt: skip
        t.row("", f"(server CPU {target['server_cpu_us_per_call']:.0f} us/call)")
    t.line()
    t.line("overhead = client round trip - reply timings.total_ms, in ms (the floor's replies")
    t.line(f"carry no timings); target: p50 <= {TARGET_P50_MS} ms with the relay; "
           f"{results['calls']} calls per row")  # fmt: skip
    m = results["machine"]
    t.line(f"CPU: {m['cpu_model']} x{m['cpus']}; load average before {results['load_before']}")
    return t.render()


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="scripts/bench-transport",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--calls", type=int, default=400, help="calls per row (default 400)")
    ap.add_argument("--model", type=Path, default=SMOL,
                    help="any GGUF file (the fake engine never reads it)")  # fmt: skip
    ap.add_argument("--before", type=Path, help="another checkout whose daemons to measure too")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench-transport.json")
    ap.add_argument("--floor", type=Path, help=argparse.SUPPRESS)  # serve the floor here
    return ap


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if a.floor is not None:
        asyncio.run(serve_floor(a.floor))
        return 0
    if not a.model.is_file():
        log(f"{a.model} is missing: run ./scripts/setup, or pass --model with any GGUF file")
        return 2
    here = Path(__file__).resolve().parent.parent
    tmp = Path(tempfile.mkdtemp(prefix="bt-", dir="/tmp"))
    results: dict[str, Any] = {"calls": a.calls, "machine": machine(), "load_before": loadavg()}
    try:
        with Children() as children, ExitStack() as stack:
            targets = [daemon(children, tmp, "relay", here, a.model, relay=True),
                       daemon(children, tmp, "direct", here, a.model, relay=False)]  # fmt: skip
            if a.before is not None:
                targets += [daemon(children, tmp, "relay@before", a.before, a.model, True),
                            daemon(children, tmp, "direct@before", a.before, a.model, False)]  # fmt: skip
            floor = tmp / "floor.sock"
            cmd = [sys.executable, "-m", "benchmarks.transport", "--floor", str(floor)]
            targets.append(Target(children, FLOOR, cmd, floor, tmp / "floor.log"))
            rows: list[Row] = []
            for target in targets:
                target.wait_ready()
                rows += rows_for(target, stack)
            log(f"measuring {len(rows)} rows x {a.calls} calls")
            measure(rows, a.calls)
            results["targets"] = {
                t.name: {
                    "server_cpu_us_per_call": round(t.cpu_s / max(t.calls, 1) * 1e6, 1),
                    "rows": {r.name: r.summary() for r in rows if r.target is t},
                }
                for t in targets
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(render(results))
    write_json(a.out, results)
    log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
