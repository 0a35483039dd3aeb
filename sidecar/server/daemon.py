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
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sidecar import reload
from sidecar.admin import DaemonAdmin
from sidecar.config import Config
from sidecar.domain.errors import ConfigError
from sidecar.dropwatch import DropWatcher
from sidecar.engine.local import PoolEngine
from sidecar.fewshot.wrapper import FewShotEngine
from sidecar.logs import configure as configure_logs
from sidecar.metrics import Metrics, MetricsServer
from sidecar.notify import Notifier
from sidecar.openai_api.app import OpenAIApp
from sidecar.openai_api.listener import HttpListener
from sidecar.router.engine import RouterEngine
from sidecar.server.accounting import RequestLog
from sidecar.server.interceptor import RequestInterceptor
from sidecar.server.peercred import PeerCredRelay
from sidecar.server.servicer import AdminServicer, InferenceServicer
from sidecar.server.socket_claim import SocketClaim
from sidecar.supervisor import Supervisor
from sidecar.update.updater import Updater
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
    engine: PoolEngine
    health: health.aio.HealthServicer
    claim: SocketClaim
    relay: PeerCredRelay | None
    tcp_port: int | None
    stop: asyncio.Event  # set by signals: serve() then shuts down
    supervisor: Supervisor
    metrics: Metrics
    metrics_server: MetricsServer | None = None
    drop: DropWatcher | None = None
    http: HttpListener | None = None
    updater: Updater | None = None
    updating: asyncio.Task[None] | None = None
    router: RouterEngine | None = None
    preparing: asyncio.Task[None] | None = None
    halt: asyncio.Event = field(default_factory=asyncio.Event)  # stops the supervisor loop
    supervising: asyncio.Task[None] | None = None
    admin: DaemonAdmin | None = None


async def start(
    config: Config,
    engine: PoolEngine | None = None,
    slot_kind: str = "process",
    heartbeat: Callable[[], None] | None = None,
) -> Running:
    """Listen, then load the models. Raises SocketBusy or the engine's start error."""
    s = config.server
    claim = SocketClaim(s.socket, dir_mode=0o750 if s.socket_group_access else 0o700)
    claim.acquire()
    engine = engine or PoolEngine(config, slot_kind)
    metrics = Metrics()
    metrics.watch(engine)
    engine.on_result = metrics.result
    requests = RequestLog(metrics, config.default_model, frozenset(m.name for m in config.models))
    interceptor = RequestInterceptor(requests, s.tcp_token if s.tcp_port else "")
    server = grpc.aio.server(
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ],
    )
    health_servicer = health.aio.HealthServicer()
    supervisor = Supervisor(
        engine, s, lambda ready: _publish(health_servicer, ready), heartbeat=heartbeat
    )
    fewshot = FewShotEngine(engine, config.store.path / "router" / "examples", config.tasks)
    router = RouterEngine(fewshot, config, on_route=metrics.route, tasks=fewshot)
    metrics.watch_router(router)
    pb_grpc.add_InferenceServicer_to_server(InferenceServicer(router), server)
    updater = Updater(engine, metrics, supervisor.probe_errors)
    admin = DaemonAdmin(
        engine, engine.store, supervisor, updater, metrics, s.socket, router.cloud_report
    )
    pb_grpc.add_AdminServicer_to_server(AdminServicer(admin), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (INFERENCE_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    relay = PeerCredRelay(s.socket, private_socket(s.socket)) if s.peer_credentials else None
    old_umask = os.umask(0o177)  # sockets are born 0600: no window where others can connect
    try:
        if relay is not None:
            relay.private.unlink(missing_ok=True)
            server.add_insecure_port(f"unix:{relay.private}")
        else:
            server.add_insecure_port(f"unix:{s.socket}")
        tcp = f"{_host(s.tcp_host)}:{s.tcp_port}"
        tcp_port = server.add_insecure_port(tcp) if s.tcp_port else None
        await server.start()
        if relay is not None:
            await relay.start()
    except BaseException:
        await server.stop(0)
        claim.release()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(s.socket, s.socket_mode)
    # One line per listener: under journald this is how an operator finds the daemon.
    where = [f"unix:{s.socket}"] + ([f"{_host(s.tcp_host)}:{tcp_port}"] if tcp_port else [])
    log.info("gRPC API on %s", ", ".join(where))
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await _publish(health_servicer, {m.name: False for m in config.models})
    running = Running(
        server,
        engine,
        health_servicer,
        claim,
        relay,
        tcp_port,
        asyncio.Event(),
        supervisor,
        metrics,
        router=router,
    )
    if config.http.enabled:
        app = OpenAIApp(router, requests, config.http.token, s.max_message_bytes)
        running.http = HttpListener(app.asgi(), config.http, s.socket_mode, s.grace_seconds)
        try:
            await running.http.start()
        except BaseException:
            running.http = None
            await _stop_listening(running, 0)
            raise
    m = config.metrics
    if m.enabled:
        running.metrics_server = MetricsServer(
            metrics.registry, m.host, m.port, Path(m.socket) if m.socket else None
        )
        port = running.metrics_server.port
        at = f"unix:{m.socket}" if m.socket else f"http://{_host(m.host)}:{port}/metrics"
        log.info("Prometheus metrics on %s", at)
    try:
        await engine.start()
    except BaseException:
        await _stop_listening(running, 0)
        raise
    await supervisor.publish()
    running.supervising = asyncio.create_task(supervisor.run(running.halt))
    running.updater = updater
    running.admin = admin
    running.updating = asyncio.create_task(updater.run(running.halt))
    # Config tasks embed their examples in the background: serving starts at once.
    running.preparing = asyncio.create_task(fewshot.prepare())
    if config.store.drop is not None:
        drop = running.drop = DropWatcher(engine, config.store.drop, config.store.auto_swap)
        admin.drop_watcher = lambda: drop.health
        await drop.start()
    return running


async def _publish(h: health.aio.HealthServicer, ready: dict[str, bool]) -> None:
    def status(ok: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
        r = health_pb2.HealthCheckResponse
        return r.SERVING if ok else r.NOT_SERVING

    await h.set(INFERENCE_SERVICE, status(bool(ready) and all(ready.values())))
    for name, ok in ready.items():
        await h.set(model_health_name(name), status(ok))


async def shutdown(running: Running, config: Config) -> None:
    running.halt.set()
    if running.drop is not None:
        await running.drop.close()
    if running.supervising is not None:
        await running.supervising
    if running.updating is not None:
        # An install in flight is abandoned here; its partial files resume next start.
        running.updating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running.updating
    if running.preparing is not None:
        running.preparing.cancel()  # the vectors embedded so far are lost; cheap to redo
        with contextlib.suppress(asyncio.CancelledError):
            await running.preparing
    await _publish(running.health, {m.name: False for m in config.models})
    if running.relay is not None:
        running.relay.stop_accepting()  # new connections are refused; open ones drain below
    await _stop_listening(running, config.server.grace_seconds)
    if running.router is not None:
        await running.router.close()  # the cloud client, then the local engine
    else:
        await running.engine.close()


async def _stop_listening(running: Running, grace: float) -> None:
    # Both front ends drain at once, each bounded by the grace period.
    stopping = [running.server.stop(grace)]
    if running.http is not None:
        stopping.append(running.http.close())
    await asyncio.gather(*stopping)
    if running.metrics_server is not None:
        running.metrics_server.close()
    if running.relay is not None:
        await running.relay.close()
    running.claim.release()


def private_socket(public: Path) -> Path:
    return public.with_name(f".{public.name}.grpc")


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def serve(
    config: Config,
    slot_kind: str = "process",
    on_ready: Callable[[Running], None] | None = None,
    reload: Callable[[], Config] | None = None,
    notifier: Notifier | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (a second one exits at once); SIGHUP reloads the config.

    Signal handlers only set events; this loop does the work.
    """
    notify = notifier or Notifier.from_env({})
    running = await start(config, slot_kind=slot_kind, heartbeat=notify.watchdog)
    loop = asyncio.get_running_loop()
    hup = asyncio.Event()

    def on_stop(signum: int) -> None:
        if running.stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            sys.stderr.flush()
            os._exit(128 + signum)
        running.stop.set()

    signals = {signal.SIGTERM: on_stop, signal.SIGINT: on_stop, signal.SIGHUP: lambda _n: hup.set()}
    for sig, handler in signals.items():
        loop.add_signal_handler(sig, handler, sig)
    if on_ready is not None:
        on_ready(running)
    notify.ready()
    notify.status(f"serving {', '.join(m.name for m in config.models)} on {config.server.socket}")
    try:
        while not running.stop.is_set():
            waiters = [asyncio.create_task(running.stop.wait()), asyncio.create_task(hup.wait())]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
            if hup.is_set() and not running.stop.is_set():
                hup.clear()
                notify.reloading()
                config = reload_config(running, config, reload)
                notify.ready()
                notify.status(f"reloaded: {running.supervisor.last_reload}")
    finally:
        for sig in signals:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        log.info("draining (up to %.0fs)", config.server.grace_seconds)
        notify.stopping()
        await shutdown(running, config)
    log.info("stopped")
    return 0


def reload_config(running: Running, current: Config, load: Callable[[], Config] | None) -> Config:
    """Apply what can change live; name what cannot. A bad file changes nothing."""
    if load is None:
        running.supervisor.last_reload = "reload is not available (no config source)"
        log.warning("SIGHUP: %s", running.supervisor.last_reload)
        return current
    try:
        new = load()
    except ConfigError as e:
        running.supervisor.last_reload = f"rejected, nothing changed: {e}"
        log.error("SIGHUP: %s", running.supervisor.last_reload)
        return current
    changes = reload.diff(current, new)
    merged = reload.merge_live(current, new, changes)
    configure_logs(merged.log.level, merged.log.format)
    running.engine.config = merged  # swaps read store.* from here
    for m in merged.models:
        pool = running.engine.pools[m.name]
        # The pool serves the file the store chose (a swap moves it); the config's path
        # is only where the model came from at start.
        pool.reconfigure(replace(m, path=pool.config.path))
    running.supervisor.server = merged.server
    if running.router is not None:  # cloud.* and tasks.*.threshold are read per request
        running.router.settings = merged.cloud
        running.router.tasks.retune(merged.tasks)
    if running.drop is not None:
        running.drop.auto_swap = merged.store.auto_swap
    running.supervisor.last_reload = reload.summary(changes)
    pending = [c for c in changes if not c.live]
    log.log(
        logging.WARNING if pending else logging.INFO, "SIGHUP: %s", running.supervisor.last_reload
    )
    return merged
