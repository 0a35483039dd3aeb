"""`sidecar update ...`: publish signed deltas (keygen, make, publish) and install them
through the running daemon (check, apply)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import grpc

from sidecar.cli_support import EXIT_FAILED, call, client_options, connect, dump
from sidecar.v1 import inference_pb2 as pb


@click.group()
def update() -> None:
    """Signed delta updates: keygen, make, publish (publisher); check, apply (daemon)."""


# ---------------------------------------------------------------- publisher


@update.command()
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Private key file to write (PEM); the public key is printed.")  # fmt: skip
def keygen(out: Path) -> None:
    """Make an Ed25519 signing key. Keep the private key off the fleet; give daemons the
    printed public key (models.NAME.update_key)."""
    from sidecar.update.manifest import generate_keypair

    if out.exists():
        click.echo(f"error: {out} exists; refusing to overwrite a signing key", err=True)
        sys.exit(EXIT_FAILED)
    private, public = generate_keypair()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = out.open("xb")  # exclusive: never clobber a key that appeared meanwhile
    with fd:
        out.chmod(0o600)
        fd.write(private)
    (out.with_name(out.name + ".pub")).write_text(public + "\n")
    click.echo(public)


@update.command()
@click.argument("old", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("new", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--origin", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The origin folder; the delta goes to ORIGIN/deltas/.")  # fmt: skip
def make(old: Path, new: Path, origin: Path) -> None:
    """Write the delta that turns OLD into NEW (GGUF-aware; any file works)."""
    from sidecar.update.delta import make_delta

    deltas = origin / "deltas"
    deltas.mkdir(parents=True, exist_ok=True)
    tmp = deltas / f".{new.name}.making"
    info = make_delta(old, new, tmp)
    out = deltas / f"{info.base_sha256[:12]}-{info.target_sha256[:12]}.delta"
    tmp.replace(out)
    size = out.stat().st_size
    click.echo(
        f"{out}: {size} bytes for a {info.target_size}-byte file "
        f"({100 * size / max(info.target_size, 1):.3f}%, {info.mode}, {info.ops} ops)"
    )


@update.command()
@click.argument("origin", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", required=True, help="Model name the manifest is for.")
@click.option("--version", "version", type=int, required=True,
              help="Monotonically increasing version number.")  # fmt: skip
@click.option("--file", "file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="The full model file of this version.")  # fmt: skip
@click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The private signing key (from keygen).")  # fmt: skip
@click.option("--expires-days", type=float, default=30.0, show_default=True,
              help="Daemons refuse the manifest after this (freeze-attack protection).")  # fmt: skip
def publish(origin: Path, name: str, version: int, file: Path, key: Path, expires_days: float) -> None:  # fmt: skip
    """Write or update ORIGIN/NAME.manifest.json, signed: the full file, the deltas that
    lead to it (from `make`), and an expiry. Serve ORIGIN from any static file server."""
    from sidecar.update.manifest import publish as do_publish

    try:
        m = do_publish(origin, name=name, version=version, key_path=key, file=file,
                       expires_days=expires_days)  # fmt: skip
    except (ValueError, OSError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_FAILED)
    click.echo(
        f"{origin / (name + '.manifest.json')}: {name} v{m.version} ({m.sha256[:12]}, "
        f"{m.size} bytes), {len(m.deltas)} delta(s), expires {m.expires.isoformat()}"
    )


# ---------------------------------------------------------------- daemon side


@update.command()
@click.argument("model", default="")
@client_options
@click.pass_context
def check(ctx: click.Context, model: str, socket: Path | None, tcp: str | None,
          token: str | None, timeout: float, as_json: bool) -> None:  # fmt: skip
    """Ask the daemon whether MODEL (default: the default model) has an update."""
    with connect(ctx, socket, tcp, token, timeout) as c:
        reply = call(lambda: c.admin.CheckUpdate(pb.UpdateRequest(model=model), **c._kw(timeout)))
    if as_json:
        click.echo(dump(reply))
        return
    have = f"v{reply.installed_version}" if reply.installed_version else "an unpublished file"
    if reply.update_available:
        click.echo(f"{reply.model}: v{reply.available_version} available (serving {have}); "
                   f"would fetch {reply.plan}")  # fmt: skip
    else:
        click.echo(f"{reply.model}: {reply.detail}")


@update.command()
@click.argument("model", default="")
@client_options
@click.pass_context
def apply(ctx: click.Context, model: str, socket: Path | None, tcp: str | None,
          token: str | None, timeout: float, as_json: bool) -> None:  # fmt: skip
    """Fetch, rebuild, verify and hot-swap MODEL's update, with progress.

    Waits as long as the daemon works on it (downloads have their own deadline,
    update.fetch_deadline_seconds) unless --timeout is given. Leaving early (Ctrl-C, or
    --timeout) stops the download; its partial file stays and the next apply resumes it.

    Exit 0 when the new version serves (or nothing was to do), 1 when the update was
    refused (the current model keeps serving; the reason is printed)."""
    bar = _Bar()
    # The generic 60 s default fits a quick RPC, not a download: leaving cancels it.
    explicit = ctx.get_parameter_source("timeout") is not click.core.ParameterSource.DEFAULT
    with connect(ctx, socket, tcp, token, timeout) as c:
        try:
            for step in c.admin.ApplyUpdate(pb.UpdateRequest(model=model),
                                            timeout=timeout if explicit else None,
                                            metadata=c._md):  # fmt: skip
                if as_json:
                    click.echo(dump(step))
                elif step.HasField("outcome"):
                    bar.end()
                    click.echo(_summary(step.outcome))
                elif step.total_bytes:
                    bar.show(step.stage, step.detail, step.done_bytes, step.total_bytes)
                else:
                    bar.end()
                    click.echo(f"[{step.elapsed_ms / 1000:6.1f}s] {step.stage}: {step.detail}",
                               err=True)  # fmt: skip
        except grpc.RpcError as e:
            bar.end()
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                click.echo(f"gave up after --timeout {timeout:g}s: the daemon stops the "
                           "download; the next `sidecar update apply` resumes it", err=True)  # fmt: skip
            else:
                click.echo(f"refused: {e.code().name}: {e.details()}", err=True)
            raise SystemExit(EXIT_FAILED) from None


def _summary(o: pb.UpdateOutcome) -> str:
    if not o.installed:
        return f"{o.model}: {o.plan}"
    share = 100 * o.fetched_bytes / max(o.full_bytes, 1)
    return (
        f"ok: {o.model} v{o.from_version or '?'} -> v{o.to_version} ({o.new_version}) via {o.plan}; "
        f"fetched {_mb(o.fetched_bytes)} of {_mb(o.full_bytes)} full size ({share:.2f}%)"
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n} B"


class _Bar:
    """A one-line progress bar on stderr (only when it is a terminal)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.open = False
        self.last = ""

    def show(self, stage: str, detail: str, done: int, total: int) -> None:
        width = 30
        filled = int(width * done / total) if total else 0
        line = (
            f"{stage:10} [{'#' * filled}{'.' * (width - filled)}] {_mb(done)}/{_mb(total)} {detail}"
        )
        if self.tty:
            click.echo("\r" + line[:120], nl=False, err=True)
            self.open = True
        elif stage != self.last:  # in logs, one line per stage is enough
            click.echo(line, err=True)
        self.last = stage

    def end(self) -> None:
        if self.open:
            click.echo("", err=True)
            self.open = False
