"""Assembling and running the daemon: socket, gRPC server, health, engine, signals.

Order matters: the socket answers first (health says the process is alive but
`sidecar.v1.Inference` is NOT_SERVING), then the models load, then readiness flips
to SERVING. On SIGTERM/SIGINT readiness flips back, new calls are refused, in-flight
calls get `server.grace_seconds` to finish, workers stop, the socket is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sidecar.config import Config
from sidecar.engine.engine import Engine, PoolEngine
from sidecar.server.interceptor import RequestInterceptor
from sidecar.server.servicer import AdminServicer, InferenceServicer
from sidecar.server.socket_claim import SocketClaim
from sidecar.v1 import inference_pb2 as pb
from sidecar.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger("sidecar.daemon")

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["Admin"].full_name


def model_health_name(model: str) -> str:
    return f"{INFERENCE_SERVICE}/{model}"


@dataclass
class Running:
    """What a started daemon exposes to its caller (the CLI, or tests in-process)."""

    server: grpc.aio.Server
    engine: Engine
    health: health.aio.HealthServicer
    claim: SocketClaim
    tcp_port: int | None
    stop: asyncio.Event


async def start(config: Config, engine: Engine | None = None, slot_kind: str = "process") -> Running:
    """Listen, then load the models. Raises SocketBusy or the engine's start error."""
    s = config.server
    claim = SocketClaim(s.socket, dir_mode=0o750 if s.socket_group_access else 0o700)
    claim.acquire()
    engine = engine or PoolEngine(config, slot_kind)
    interceptor = RequestInterceptor(s.tcp_token if s.tcp_port else "")
    server = grpc.aio.server(
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ],
    )
    health_servicer = health.aio.HealthServicer()
    pb_grpc.add_InferenceServicer_to_server(InferenceServicer(engine), server)
    pb_grpc.add_AdminServicer_to_server(AdminServicer(engine, s.socket, interceptor.counters), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (INFERENCE_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    old_umask = os.umask(0o177)  # the socket is born 0600: no window where others can connect
    try:
        server.add_insecure_port(f"unix:{s.socket}")
        tcp_port = server.add_insecure_port(f"{_host(s.tcp_host)}:{s.tcp_port}") if s.tcp_port else None
        await server.start()
    except BaseException:
        claim.release()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(s.socket, s.socket_mode)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await _set_ready(health_servicer, config, False)
    try:
        await engine.start()
    except BaseException:
        await server.stop(0)
        claim.release()
        raise
    await _set_ready(health_servicer, config, True)
    return Running(server, engine, health_servicer, claim, tcp_port, asyncio.Event())


async def _set_ready(h: health.aio.HealthServicer, config: Config, ready: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
    await h.set(INFERENCE_SERVICE, status)
    for m in config.models:
        await h.set(model_health_name(m.name), status)


async def shutdown(running: Running, config: Config) -> None:
    await _set_ready(running.health, config, False)
    await running.server.stop(config.server.grace_seconds)
    await running.engine.close()
    running.claim.release()


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def serve(
    config: Config, slot_kind: str = "process", on_ready: Callable[[Running], None] | None = None
) -> int:
    """Run until SIGTERM/SIGINT; a second signal forces an immediate exit."""
    running = await start(config, slot_kind=slot_kind)
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if running.stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            sys.stderr.flush()
            os._exit(128 + signum)
        log.info("%s: draining (up to %.0fs)", signal.Signals(signum).name, config.server.grace_seconds)
        running.stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    if on_ready is not None:
        on_ready(running)
    try:
        await running.stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await shutdown(running, config)
    log.info("stopped")
    return 0
