"""The composition root: the one place that knows every part of the daemon.

`App(config)` builds the parts (no I/O); `start()` listens, then loads the models, then
runs the background loops; `reload(load)` applies what a SIGHUP can change live and names
the rest; `stop()` drains and stops. `serve()` is the daemon's main loop around them.

The stack it builds, top to bottom (each engine wraps the next, all behind the `Engine`
seam the front ends see)::

    gRPC front end ─┐                      ┌─ DaemonAdmin (Admin seam)
    HTTP front end ─┴─ RouterEngine ─ FewShotEngine ─ PoolEngine ─ workers
                        (cloud, budget,    (Classify by     (pools, swap,
                         privacy gate)      examples)        store)

Order at start matters: the socket answers first (health: the process is alive, but
`sidecar.v1.Inference` is NOT_SERVING), then the models load, then readiness flips to
SERVING. On stop readiness flips back, new calls are refused, in-flight calls get
`server.grace_seconds` to finish, workers stop, the sockets are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

from sidecar import reload as reloading
from sidecar.admin import DaemonAdmin
from sidecar.calls.accounting import RequestLog
from sidecar.config import Config
from sidecar.domain.errors import ConfigError
from sidecar.domain.seam import Engine
from sidecar.dropwatch import DropWatcher
from sidecar.engine.local import PoolEngine
from sidecar.engine.slots import SlotFactory
from sidecar.fewshot.wrapper import FewShotEngine
from sidecar.logs import configure as configure_logs
from sidecar.metrics import CallLabels, Metrics, MetricsServer
from sidecar.notify import Notifier
from sidecar.openai_api.app import OpenAIApp
from sidecar.openai_api.listener import HttpListener
from sidecar.router.breaker import Breaker
from sidecar.router.budget import Budget, Prices
from sidecar.router.cloud import CloudClient, CloudEndpoint
from sidecar.router.engine import RouterEngine
from sidecar.router.fitted import FILE as FITTED_FILE
from sidecar.router.fitted import FittedThresholds
from sidecar.router.outbound import Gate
from sidecar.router.privacy import Scanner
from sidecar.router.shadow import Shadow
from sidecar.server.grpc_listener import GrpcListener, bracketed
from sidecar.store import open_store
from sidecar.supervisor import Supervisor
from sidecar.update.updater import Updater

log = logging.getLogger("sidecar.daemon")


class App:
    def __init__(
        self,
        config: Config,
        *,
        slot_kind: str = "process",
        make_slot: SlotFactory | None = None,
        heartbeat: Callable[[], None] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        s = config.server
        self.store = open_store(config.store, os.environ if env is None else env)
        self.local = PoolEngine(config, slot_kind, make_slot, store=self.store)
        self.metrics = Metrics()
        self.metrics.watch(self.local)
        self.local.on_result = self.metrics.result
        self.local.on_swap = self.metrics.swapped
        self.fewshot = FewShotEngine(
            self.local, config.store.path / "router" / "examples", config.tasks
        )
        self.router = _router(config, self.fewshot, os.environ if env is None else env)
        self.router.on_route = self.metrics.route
        self.metrics.watch_router(self.router)
        # What the front ends are handed: the router, its calls labelled for the token counters.
        self.engine: Engine = CallLabels(self.router, [m.name for m in config.models])
        self.supervisor = Supervisor(
            self.local, s, lambda ready: self.grpc.publish(ready), heartbeat=heartbeat
        )
        self.metrics.watch_readiness(self.supervisor)
        self.updater = Updater(self.local, self.metrics, self.supervisor.probe_errors)
        self.metrics.watch_rollouts(self.updater)
        self.drop: DropWatcher | None = None
        if config.store.drop is not None:
            self.drop = DropWatcher(
                self.local,
                config.store.drop,
                config.store.auto_swap,
                remove_plaintext=config.store.drop_remove_plaintext,
            )
        self.last_reload = ""  # how the last SIGHUP ended, for status
        self.admin = DaemonAdmin(
            self.local,
            self.store,
            self.supervisor,
            self.updater,
            self.metrics,
            s.socket,
            self.router.cloud_report,
            last_reload=lambda: self.last_reload,
            drop_watcher=lambda: self.drop.health if self.drop is not None else "",
        )
        requests = RequestLog(
            self.metrics, config.default_model, frozenset(m.name for m in config.models)
        )
        self.grpc = GrpcListener(s, self.engine, self.admin, requests)
        self.http: HttpListener | None = None
        if config.http.enabled:
            api = OpenAIApp(self.engine, requests, config.http.token, s.max_message_bytes)
            self.http = HttpListener(api.asgi(), config.http, s.socket_mode, s.grace_seconds)
        self.metrics_server: MetricsServer | None = None
        self.stopping = asyncio.Event()  # set by signals: serve() then shuts down
        self._halt = asyncio.Event()  # stops the supervisor and update loops
        self._supervising: asyncio.Task[None] | None = None
        self._cancelled_at_stop: list[asyncio.Task[None]] = []
        self._listening = False

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Listen, then load the models. Raises SocketBusy or the engine's start error;
        either way nothing is left listening."""
        await self.grpc.start(m.name for m in self.config.models)
        self._listening = True
        # Only now, holding the socket, is this daemon the store's owner (a second
        # `sidecar serve` must not touch a running daemon's copies in flight).
        await asyncio.to_thread(self.store.sweep)
        try:
            if self.http is not None:
                await self.http.start()  # a listener that fails here has released itself
            self._serve_metrics()
            await self.engine.start()
        except BaseException:
            await self._stop_listening(0)
            raise
        await self.updater.start()
        await self.supervisor.publish()
        self._supervising = asyncio.create_task(self.supervisor.run(self._halt))
        # An update install in flight when the daemon stops is abandoned (its partial files
        # resume next start); a config task being prepared loses the vectors embedded so
        # far (cheap to redo). Config tasks embed in the background: serving starts at once.
        for work in (self.updater.run(self._halt), self.fewshot.prepare()):
            self._cancelled_at_stop.append(asyncio.create_task(work))
        if self.router.fitted is not None:  # a fit applies within a second, no signal needed
            self._cancelled_at_stop.append(asyncio.create_task(self.router.fitted.watch()))
        if self.drop is not None:
            await self.drop.start()

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop everything; `grace` defaults to server.grace_seconds."""
        grace = self.config.server.grace_seconds if grace is None else grace
        self._halt.set()
        if self.drop is not None:
            await self.drop.close()
        if self._supervising is not None:
            await self._supervising  # ends its loop on the halt
            self._supervising = None
        for task in self._cancelled_at_stop:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._cancelled_at_stop.clear()
        await self.grpc.publish(dict.fromkeys((m.name for m in self.config.models), False))
        self.grpc.stop_accepting()
        await self._stop_listening(grace)
        await self.engine.close()  # the cloud client, then the local workers

    @property
    def listening(self) -> bool:
        return self._listening

    def _serve_metrics(self) -> None:
        m = self.config.metrics
        if not m.enabled:
            return
        self.metrics_server = MetricsServer(
            self.metrics.registry, m.host, m.port, Path(m.socket) if m.socket else None
        )
        port = self.metrics_server.port
        at = f"unix:{m.socket}" if m.socket else f"http://{bracketed(m.host)}:{port}/metrics"
        log.info("Prometheus metrics on %s", at)

    async def _stop_listening(self, grace: float) -> None:
        # Both front ends drain at once, each bounded by the grace period.
        stopping = [self.grpc.stop(grace)]
        if self.http is not None:
            stopping.append(self.http.close(grace))
        await asyncio.gather(*stopping)
        if self.metrics_server is not None:
            self.metrics_server.close()
        self._listening = False

    # ---------------------------------------------------------------- reload

    def reload(self, load: Callable[[], Config] | None) -> None:
        """Apply what can change live; name what cannot. A bad file changes nothing."""
        if load is None:
            self.last_reload = "reload is not available (no config source)"
            log.warning("SIGHUP: %s", self.last_reload)
            return
        try:
            new = load()
        except ConfigError as e:
            self.last_reload = f"rejected, nothing changed: {e}"
            log.error("SIGHUP: %s", self.last_reload)
            return
        changes = reloading.diff(self.config, new)
        self.apply(reloading.merge_live(self.config, new, changes))
        self.last_reload = reloading.summary(changes)
        pending = any(not c.live for c in changes)
        log.log(logging.WARNING if pending else logging.INFO, "SIGHUP: %s", self.last_reload)

    def apply(self, merged: Config) -> None:
        """Hand each part its live settings; every key the schema marks live is read from
        what is set here (tests/service/test_reload_every_key.py holds each one to it)."""
        self.config = merged
        configure_logs(merged.log.level, merged.log.format)
        # server.*, store.* (read per swap) and update.* (read per poll) are read from here.
        self.local.config = merged
        for m in merged.models:
            pool = self.local.pools[m.name]
            # The pool serves the file the store chose (a swap moves it); the config's path
            # is only where the model came from at start.
            pool.reconfigure(replace(m, path=pool.config.path))
        self.supervisor.server = merged.server
        c = merged.cloud
        self.router.settings = c
        self.router.budget.set_limits(
            Prices(c.prompt_price_per_mtok, c.completion_price_per_mtok),
            c.daily_cap,
            c.monthly_cap,
        )
        self.router.gate.update(Scanner(c.sensitive, c.sensitive_patterns), c.redact)
        if self.router.shadow is not None:
            self.router.shadow.rate = c.shadow_rate
            prices = Prices(c.prompt_price_per_mtok, c.completion_price_per_mtok)
            self.router.shadow.budget.set_limits(prices, c.shadow_daily_cap, 0.0)
        self.fewshot.retune(merged.tasks)
        if self.router.fitted is not None:
            self.router.fitted.reload()
        if self.drop is not None:
            self.drop.auto_swap = merged.store.auto_swap
            self.drop.remove_plaintext = merged.store.drop_remove_plaintext


def _router(config: Config, inner: FewShotEngine, env: Mapping[str, str]) -> RouterEngine:
    """The router and the parts it escalates through, each built once from [cloud]."""
    c = config.cloud
    breaker = Breaker(c.breaker_failures, c.breaker_cooldown_seconds)
    gate = Gate(Scanner(c.sensitive, c.sensitive_patterns), c.redact)
    budget = Budget(
        config.store.path / "router" / "budget.json",
        Prices(c.prompt_price_per_mtok, c.completion_price_per_mtok),
        c.daily_cap,
        c.monthly_cap,
    )
    cloud = None
    if c.enabled:
        endpoint = CloudEndpoint(
            c.base_url, c.model, c.api_key_env, c.timeout_seconds, c.retries, c.backoff_seconds
        )
        cloud = CloudClient(endpoint, breaker, env, gate)
    fitted = FittedThresholds(config.store.path / "router" / FITTED_FILE)
    # Built without a cloud too, so a reload that sets shadow keys finds where they go.
    where = config.store.path / "router" / "shadow"
    spend = Budget(where / "budget.json", budget.prices, c.shadow_daily_cap, autosave=False)
    shadow = Shadow(where, spend, c.shadow_rate)
    return RouterEngine(inner, c, breaker=breaker, budget=budget, gate=gate, cloud=cloud,
                        tasks=inner, fitted=fitted, shadow=shadow)  # fmt: skip


async def serve(
    config: Config,
    slot_kind: str = "process",
    on_ready: Callable[[App], None] | None = None,
    reload: Callable[[], Config] | None = None,
    notifier: Notifier | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (a second one exits at once); SIGHUP reloads the config.

    Signal handlers only set events; this loop does the work.
    """
    notify = notifier or Notifier.from_env({})
    app = App(config, slot_kind=slot_kind, heartbeat=notify.watchdog)
    await app.start()
    loop = asyncio.get_running_loop()
    hup = asyncio.Event()

    def on_stop(signum: int) -> None:
        if app.stopping.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            sys.stderr.flush()
            os._exit(128 + signum)
        app.stopping.set()

    signals = {signal.SIGTERM: on_stop, signal.SIGINT: on_stop, signal.SIGHUP: lambda _n: hup.set()}
    for sig, handler in signals.items():
        loop.add_signal_handler(sig, handler, sig)
    if on_ready is not None:
        on_ready(app)
    notify.ready()
    notify.status(f"serving {', '.join(m.name for m in config.models)} on {config.server.socket}")
    try:
        while not app.stopping.is_set():
            waiters = [asyncio.create_task(app.stopping.wait()), asyncio.create_task(hup.wait())]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
            if hup.is_set() and not app.stopping.is_set():
                hup.clear()
                notify.reloading()
                app.reload(reload)
                notify.ready()
                notify.status(f"reloaded: {app.last_reload}")
    finally:
        for sig in signals:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        log.info("draining (up to %.0fs)", app.config.server.grace_seconds)
        notify.stopping()
        await app.stop()
    log.info("stopped")
    return 0
