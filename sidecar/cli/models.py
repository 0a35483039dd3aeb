"""`sidecar swap` and `sidecar models ...`: the store and hot swap, through the running daemon.

Going through the daemon (not the store's files directly) keeps one writer of the
store and lets removal and garbage collection see which files workers still map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import grpc

from sidecar.cli.support import (
    EXIT_DETACHED,
    EXIT_FAILED,
    Left,
    call,
    client_options,
    connect,
    dump,
    dump_line,
    wait_limit,
    waiting,
)
from sidecar.domain.names import name_problem
from sidecar.v1 import inference_pb2 as pb


def _valid(name: str, param: str = "TARGET") -> str:
    """The daemon checks names too; checking here says so before anything is sent.
    MODEL:ADAPTER names a LoRA adapter of MODEL; each part is a name."""
    for part in name.split(":", 1) if name else ():
        problem = name_problem(part)
        if problem:
            raise click.BadParameter(problem, param_hint=param)
    return name


def parse_target(target: str) -> tuple[str, str, str]:
    """NAME, NAME@VERSION or a path (PATH, or NAME=PATH) -> (name, version, path)."""
    if "=" in target:
        name, _, path = target.partition("=")
        return _valid(name), "", str(Path(path).resolve())
    if "/" in target or target.endswith(".gguf"):
        return "", "", str(Path(target).resolve())
    name, _, version = target.partition("@")
    return _valid(name), version, ""


DETACHED = "detached: the swap is still running on the daemon; follow it with `sidecar status`"


@click.command()
@click.argument("target")
@click.option(
    "--strategy",
    type=click.Choice(["side_by_side", "replace"]),
    help="Default: store.swap_strategy.",
)
@client_options
@click.pass_context
def swap(ctx: click.Context, target: str, strategy: str | None, socket: Path | None, tcp: str | None,
         token: str | None, timeout: float, as_json: bool) -> None:  # fmt: skip
    """Hot-swap a model: NAME@VERSION (stored), PATH or NAME=PATH (a new file).

    Progress is shown as it happens. A swap, once started, runs to its end on the daemon,
    whatever this command does: its outcome shows in `sidecar status` (last swap) and the
    log. The command waits for that end unless --timeout is given.

    \b
    Exit codes:
      0   the new model serves (or already did)
      1   the daemon refused the swap: the old model keeps serving (the reason is printed)
      4   detached: --timeout passed first; the swap goes on (see `sidecar status`)
      130 Ctrl-C: detached the same way
    """
    name, version, path = parse_target(target)
    request = pb.SwapRequest(model=name, version=version, path=path, strategy=strategy or "")
    with connect(ctx, socket, tcp, token, timeout) as c:
        progress = c.admin.Swap(request, metadata=c._md)
        try:
            with waiting(progress, wait_limit(ctx, timeout)):
                for step in progress:
                    if as_json:
                        click.echo(dump_line(step))
                    elif step.finished:
                        click.echo(f"ok: {step.new.name} {step.old.version} -> {step.new.version} "
                                   f"in {step.elapsed_ms / 1000:.1f}s")  # fmt: skip
                    else:
                        click.echo(
                            f"[{step.elapsed_ms / 1000:6.1f}s] {step.stage}: {step.detail}",
                            err=True,
                        )
        except Left as left:
            click.echo(DETACHED, err=True)
            left.exit(EXIT_DETACHED)
        except grpc.RpcError as e:
            click.echo(f"refused: {e.code().name}: {e.details()}", err=True)
            raise SystemExit(EXIT_FAILED) from None


@click.group(invoke_without_command=True)
@client_options
@click.pass_context
def models(ctx: click.Context, /, **opts: Any) -> None:
    """The model store: list (the default), add, activate, remove, gc."""
    ctx.obj["client"] = opts
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_versions, **opts)


def _opts(ctx: click.Context, given: dict[str, Any]) -> dict[str, Any]:
    """Client options given after the subcommand win over ones given after `models`."""
    base = dict(ctx.obj.get("client", {}))
    base.update({k: v for k, v in given.items() if v not in (None, False)})
    return base


def _client(ctx: click.Context, opts: dict[str, Any]) -> Any:
    return connect(
        ctx, opts.get("socket"), opts.get("tcp"), opts.get("token"), opts.get("timeout", 60.0)
    )


@models.command("list")
@client_options
@click.pass_context
def list_versions(ctx: click.Context, /, **given: Any) -> None:
    """Every stored version: * serving, A active (survives restarts), P previous."""
    opts = _opts(ctx, given)
    with _client(ctx, opts) as c:
        reply = call(lambda: c.admin.ListVersions(pb.ListVersionsRequest(), metadata=c._md))
    if opts.get("as_json"):
        click.echo(dump(reply))
        return
    click.echo(f"store: {reply.store}")
    for v in reply.versions:
        marks = (
            ("*" if v.serving else " ") + ("A" if v.active else " ") + ("P" if v.previous else " ")
        )
        misfit = f"  DOES NOT FIT its model now: {v.not_fitting}" if v.not_fitting else ""
        click.echo(f"{marks} {v.model}@{v.sha256[:12]}  {v.size / 2**20:8.1f} MiB{misfit}")


@models.command("add")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--name",
    required=True,
    callback=lambda _ctx, _param, value: _valid(value, "--name"),
    help="Model name to add it under ([A-Za-z0-9._-], 1-64, not starting with '.').",
)
@click.option(
    "--adapter-for",
    "adapter_for",
    metavar="MODEL",
    callback=lambda _ctx, _param, value: value and _valid(value, "--adapter-for"),
    help="The file is a LoRA adapter of MODEL, stored as MODEL:NAME: checked against the "
    "model, proven on a worker, then active (requests name it as their adapter).",
)
@client_options
@click.pass_context
def add(
    ctx: click.Context, /, path: Path, name: str, adapter_for: str | None, **given: Any
) -> None:
    """Verify a GGUF file and add it to the store (a model does not start serving; an
    adapter, --adapter-for, does once it is proven)."""
    request = pb.AddModelRequest(
        model=name, path=str(path.resolve()), adapter_for=adapter_for or ""
    )
    opts = _opts(ctx, given)
    with _client(ctx, opts) as c:
        reply = call(lambda: c.admin.AddModel(request, metadata=c._md))
    if opts.get("as_json"):
        click.echo(dump(reply))
        return
    what = "added and serving" if adapter_for else "added"
    click.echo(f"{what} {reply.version.model}@{reply.version.sha256[:12]}")


@models.command("activate")
@click.argument("target")
@click.option("--strategy", type=click.Choice(["side_by_side", "replace"]))
@client_options
@click.pass_context
def activate(ctx: click.Context, /, target: str, strategy: str | None, **given: Any) -> None:
    """Serve NAME@VERSION (a hot swap; waits and exits as `sidecar swap` does)."""
    opts = _opts(ctx, given)
    ctx.invoke(swap, target=target, strategy=strategy, **{**given, **opts})


@models.command("remove")
@click.argument("target")
@client_options
@click.pass_context
def remove(ctx: click.Context, /, target: str, **given: Any) -> None:
    """Remove NAME@VERSION (never the active one, one a running worker maps or one a swap
    is loading)."""
    name, _, version = target.partition("@")
    request = pb.RemoveVersionRequest(model=_valid(name), version=version)
    opts = _opts(ctx, given)
    with _client(ctx, opts) as c:
        call(lambda: c.admin.RemoveVersion(request, metadata=c._md))
    if opts.get("as_json"):  # the reply is empty: say what was removed
        click.echo(dump({"model": request.model, "version": request.version}))
        return
    click.echo(f"removed {target}")


@models.command("gc")
@click.option(
    "--quarantine",
    "empty_quarantine",
    is_flag=True,
    help="Also empty the quarantine (refused files and their reasons).",
)
@client_options
@click.pass_context
def gc(ctx: click.Context, /, empty_quarantine: bool, **given: Any) -> None:
    """Remove the versions nothing needs, and trim the quarantine.

    Kept: any name's active and previous version, every version a running worker still
    maps (a draining one included) or a swap is loading, and all versions of a name that
    has never been activated. The quarantine keeps its 10 newest entries, none older than
    14 days, within 2 GiB (the newest always); --quarantine empties it.
    """
    request = pb.CollectGarbageRequest(empty_quarantine=empty_quarantine)
    opts = _opts(ctx, given)
    with _client(ctx, opts) as c:
        reply = call(lambda: c.admin.CollectGarbage(request, metadata=c._md))
    if opts.get("as_json"):
        click.echo(dump(reply))
        return
    click.echo("\n".join(f"removed {r}" for r in reply.removed) or "nothing to remove")
