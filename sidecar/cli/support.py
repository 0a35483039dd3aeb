"""What every client command of the CLI shares: options, connecting, errors, output, and
leaving a long admin call early (its --timeout, or Ctrl-C)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import grpc
from google.protobuf.message import Message

from sidecar import jsonout
from sidecar.config import Config, Overrides, load
from sidecar.domain.errors import ConfigError

EXIT_FAILED, EXIT_CONFIG, EXIT_NO_DAEMON, EXIT_DETACHED, EXIT_STOPPED = 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130  # Ctrl-C: what shells expect (128 + SIGINT)
T = TypeVar("T")


def config_from(ctx: click.Context, **overrides: Any) -> Config:
    try:
        return load(Overrides(config=_config_file(ctx), **overrides))
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_CONFIG)


def _config_file(ctx: click.Context) -> Path | None:
    return (ctx.find_object(dict) or {}).get("config")


def _remember_config(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    # Kept where `sidecar --config X` keeps it; given after the subcommand, it wins.
    if value is not None:
        ctx.ensure_object(dict)["config"] = value


def config_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--config` after a subcommand too (`sidecar serve --config X`), as before it."""
    return click.option(
        "--config",
        type=click.Path(path_type=Path),
        expose_value=False,
        callback=_remember_config,
        help="Config file (also accepted before the subcommand; this one wins).",
    )(f)


def client_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")(f)
    return connection_options(f)


def connection_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """How to reach the daemon, for a command whose output is a file rather than a reply."""
    f = config_option(f)
    f = click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds.")(f)
    f = click.option("--token", help="Bearer token (with --tcp).")(f)
    f = click.option("--tcp", help="HOST:PORT of the daemon's TCP listener instead of the socket.")(
        f
    )
    f = click.option("--socket", type=click.Path(path_type=Path), help="Daemon socket path.")(f)
    return f


def connect(
    ctx: click.Context, socket: Path | None, tcp: str | None, token: str | None, timeout: float
) -> Any:
    from sidecar.client import Client

    # Found as `Client()` finds it, from the client view of the config: the daemon's own
    # checks (a token kept in the service's environment...) are no business of a client.
    try:
        client = Client(socket, tcp=tcp, token=token, timeout=timeout, config=_config_file(ctx))
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_CONFIG)
    missing = (
        f"error: no sidecar daemon is answering on {client.target}: start one with `sidecar serve`"
    )
    if client.socket is not None:
        try:
            there = client.socket.exists()
        except PermissionError:  # Path.exists raises on EACCES (Python < 3.12)
            there = False
            missing = (
                f"error: permission denied on {client.socket}: the daemon's socket directory "
                "admits its own user and group (add yourself to group `sidecar` for the "
                "system service)"
            )
        if not there:
            client.close()
            click.echo(missing, err=True)
            sys.exit(EXIT_NO_DAEMON)
    try:
        grpc.channel_ready_future(client.channel).result(timeout=min(timeout, 3.0))
    except grpc.FutureTimeoutError:
        client.close()
        click.echo(missing, err=True)
        sys.exit(EXIT_NO_DAEMON)
    return client


def call(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except grpc.RpcError as e:
        click.echo(f"error: {e.code().name}: {e.details()}", err=True)
        sys.exit(EXIT_FAILED)


def dump(message: Message | dict[str, Any]) -> str:
    """What every `--json` prints: the stable shape documented in `sidecar.jsonout`."""
    return jsonout.dumps(message)


def dump_line(message: Message | dict[str, Any]) -> str:
    """What `--json` prints per message of a stream (swap, update apply, logs): one line
    each (JSON Lines), so a program reads them as they come."""
    return jsonout.dumps_line(message)


class Left(Exception):
    """The CLI stopped waiting for a streamed admin call: its --timeout passed, or Ctrl-C.
    The call is cancelled; what that does to the work is the daemon's rule, which the
    command reports."""

    def __init__(self, interrupted: bool) -> None:
        super().__init__("interrupted" if interrupted else "timed out")
        self.interrupted = interrupted

    def exit(self, code: int) -> NoReturn:
        """Exit with `code`, or 130 after Ctrl-C whatever the work did."""
        sys.exit(EXIT_INTERRUPTED if self.interrupted else code)


def wait_limit(ctx: click.Context, timeout: float) -> float | None:
    """How long to wait for a long admin call (a swap, an update): --timeout if it was given
    (on this command or a parent group), else until the daemon ends it. The generic 60 s
    default fits a quick RPC, not a swap or a download, and the daemon bounds those itself."""
    c: click.Context | None = ctx
    while c is not None:
        if c.get_parameter_source("timeout") not in (None, click.core.ParameterSource.DEFAULT):
            return timeout
        c = c.parent
    return None


@contextmanager
def waiting(call: Any, limit: float | None) -> Iterator[None]:
    """Consume the server-streaming `call` inside this block. When `limit` seconds pass or
    the user presses Ctrl-C, the call is cancelled and `Left` is raised.

    A timer, not a gRPC deadline: a deadline error could also come from the daemon, while
    only this tells for sure that the client stopped waiting."""
    gave_up = threading.Event()

    def give_up() -> None:
        gave_up.set()
        call.cancel()

    timer = threading.Timer(limit, give_up) if limit is not None else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        yield
    except KeyboardInterrupt:
        call.cancel()
        raise Left(interrupted=True) from None
    except grpc.RpcError:
        if gave_up.is_set():
            raise Left(interrupted=False) from None
        raise
    finally:
        if timer is not None:
            timer.cancel()
