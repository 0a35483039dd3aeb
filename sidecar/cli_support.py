"""What every client command of the CLI shares: options, connecting, errors, output."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from sidecar.config import Config, Overrides, load
from sidecar.errors import ConfigError

EXIT_FAILED, EXIT_CONFIG, EXIT_NO_DAEMON = 1, 2, 3
T = TypeVar("T")


def config_from(ctx: click.Context, **overrides: Any) -> Config:
    try:
        return load(Overrides(config=ctx.obj.get("config"), **overrides))
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_CONFIG)


def client_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")(f)
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

    config = config_from(ctx, socket=socket)
    where = tcp or f"unix:{config.server.socket}"
    missing = f"error: no sidecar daemon is answering on {where}: start one with `sidecar serve`"
    if not tcp and not config.server.socket.exists():
        click.echo(missing, err=True)
        sys.exit(EXIT_NO_DAEMON)
    client = Client(
        config.server.socket,
        tcp=tcp,
        token=token or config.server.tcp_token or None,
        timeout=timeout,
    )
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


def dump(message: Message) -> str:
    return json.dumps(
        MessageToDict(message, preserving_proto_field_name=True), indent=2, ensure_ascii=False
    )
