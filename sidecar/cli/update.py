"""`sidecar update ...`: publish signed deltas (keygen, make, publish) and install them
through the running daemon (check, apply)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import click
import grpc

from sidecar.cli.progress import ProgressDisplay, mb
from sidecar.cli.support import (
    EXIT_DETACHED,
    EXIT_FAILED,
    EXIT_STOPPED,
    Left,
    call,
    client_options,
    connect,
    dump,
    dump_line,
    wait_limit,
    waiting,
)
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
@click.option(
    "--name",
    required=True,
    help="Model name the manifest is for (MODEL:ADAPTER for a LoRA adapter).",
)
@click.option("--version", "version", type=int, required=True,
              help="Monotonically increasing version number.")  # fmt: skip
@click.option("--file", "file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="The full model file of this version.")  # fmt: skip
@click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The private signing key (from keygen).")  # fmt: skip
@click.option("--expires-days", type=float, default=30.0, show_default=True,
              help="Daemons refuse the manifest after this (freeze-attack protection).")  # fmt: skip
@click.option("--rollout", type=float, default=None, metavar="F",
              help="The share of daemons (0-1) that take this version, chosen by a stable hash "
                   "of each machine; raise it by publishing the same version again. Default: "
                   "1 for a new version; the published share when re-publishing one.")  # fmt: skip
def publish(origin: Path, name: str, version: int, file: Path, key: Path, expires_days: float,
            rollout: float | None) -> None:  # fmt: skip
    """Write or update ORIGIN/NAME.manifest.json, signed: the full file, the deltas that
    lead to it (from `make`), an expiry and the rollout. Serve ORIGIN from any static file
    server. Publishing the published version again (same file) renews its expiry and sets
    its rollout."""
    from sidecar.update.manifest import publish as do_publish

    try:
        m = do_publish(origin, name=name, version=version, key_path=key, file=file,
                       expires_days=expires_days, rollout=rollout)  # fmt: skip
    except (ValueError, OSError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_FAILED)
    click.echo(
        f"{origin / (name + '.manifest.json')}: {name} v{m.version} ({m.sha256[:12]}, "
        f"{m.size} bytes), {len(m.deltas)} delta(s), rollout {_share(m.rollout)}, "
        f"expires {m.expires.isoformat()}"
    )


def _share(fraction: float) -> str:
    from sidecar.update.cohort import percent

    return percent(fraction)


# ---------------------------------------------------------------- daemon side


IGNORE_ROLLOUT = click.option(
    "--ignore-rollout", is_flag=True,
    help="Take the version even if this daemon is outside its staged rollout (a manual "
         "canary). Automatic updates never do.")  # fmt: skip


@update.command()
@click.argument("model", default="")
@IGNORE_ROLLOUT
@client_options
@click.pass_context
def check(ctx: click.Context, model: str, ignore_rollout: bool, socket: Path | None,
          tcp: str | None, token: str | None, timeout: float, as_json: bool) -> None:  # fmt: skip
    """Ask the daemon whether MODEL (default: the default model) has an update, and whether
    this daemon is in the cohort of its staged rollout."""
    request = pb.UpdateRequest(model=model, ignore_rollout=ignore_rollout)
    with connect(ctx, socket, tcp, token, timeout) as c:
        reply = call(lambda: c.admin.CheckUpdate(request, **c._kw(timeout)))
    if as_json:
        click.echo(dump(reply))
        return
    have = f"v{reply.installed_version}" if reply.installed_version else "an unpublished file"
    if reply.update_available and not reply.download_bytes:
        click.echo(f"{reply.model}: v{reply.available_version} is in the store already (serving "
                   f"{have}); `sidecar update apply` activates it")  # fmt: skip
    elif reply.update_available:
        click.echo(f"{reply.model}: v{reply.available_version} available (serving {have}); "
                   f"would fetch {reply.plan}")  # fmt: skip
    else:
        click.echo(f"{reply.model}: {reply.detail}")
    if reply.HasField("rollout") and reply.rollout.fraction < 1:
        click.echo(f"  rollout: {rollout_line(reply.rollout)}")


def rollout_line(r: pb.Rollout) -> str:
    """This daemon in a version's staged rollout, for check and status."""
    standing = "in the cohort" if r.in_cohort else "NOT in the cohort yet"
    return (
        f"v{r.version} to {_share(r.fraction)} of daemons: {standing} "
        f"(this daemon's place {_share(r.position)}, identity {r.identity})"
    )


STOPPED = "stopped: the download stops; the next `sidecar update apply` resumes it"
DETACHED = "detached: installing on the daemon; follow it with `sidecar status`"
# The stages of an apply before its install; from "installing" on it runs to its end.
DOWNLOADING = frozenset({"", "checking", "fetching", "rebuilding"})


@update.command()
@click.argument("model", default="")
@IGNORE_ROLLOUT
@client_options
@click.pass_context
def apply(ctx: click.Context, model: str, ignore_rollout: bool, socket: Path | None,
          tcp: str | None, token: str | None, timeout: float, as_json: bool) -> None:  # fmt: skip
    """Fetch, rebuild, verify and hot-swap MODEL's update, with progress.

    A daemon outside the version's staged rollout does nothing (exit 0, and says so)
    unless --ignore-rollout is given.

    Waits as long as the daemon works on it (downloads have their own deadline,
    update.fetch_deadline_seconds) unless --timeout is given. Leaving early (--timeout, or
    Ctrl-C) during the download stops it: its partial file stays and the next apply
    resumes it. Once the install has begun it runs to its end on the daemon, like a swap;
    its outcome shows in `sidecar status` (last update).

    \b
    Exit codes:
      0   the new version serves (or nothing was to do)
      1   the update was refused or failed: the current model keeps serving
          (the reason is printed)
      4   detached: left during the install, which goes on (see `sidecar status`)
      5   stopped: left during the download, which stopped; the next apply resumes it
      130 Ctrl-C, after saying which of the two happened
    """
    bar = ProgressDisplay()
    stage = ""
    with connect(ctx, socket, tcp, token, timeout) as c:
        request = pb.UpdateRequest(model=model, ignore_rollout=ignore_rollout)
        steps = c.admin.ApplyUpdate(request, metadata=c._md)
        try:
            with waiting(steps, wait_limit(ctx, timeout)):
                for step in steps:
                    stage = step.stage
                    if as_json:
                        click.echo(dump_line(step))
                    elif step.HasField("outcome"):
                        bar.end()
                        click.echo(_summary(step.outcome))
                    elif step.total_bytes:
                        bar.show(step.stage, step.detail, step.done_bytes, step.total_bytes)
                    else:
                        bar.end()
                        click.echo(f"[{step.elapsed_ms / 1000:6.1f}s] {step.stage}: {step.detail}",
                                   err=True)  # fmt: skip
        except Left as left:
            bar.end()
            if _installing(c, model, stage):
                click.echo(DETACHED, err=True)
                left.exit(EXIT_DETACHED)
            click.echo(STOPPED, err=True)
            left.exit(EXIT_STOPPED)
        except grpc.RpcError as e:
            bar.end()
            click.echo(f"refused: {e.code().name}: {e.details()}", err=True)
            raise SystemExit(EXIT_FAILED) from None


def _installing(c: Any, model: str, seen: str) -> bool:
    """Whether the apply we left had begun its install (so it goes on). The last stage we
    saw says so, unless the daemon moved on before our cancel reached it: its status, asked
    after the cancel, has the last word."""
    if seen not in DOWNLOADING:
        return True
    try:
        reply = c.status(timeout=3.0)
    except grpc.RpcError:
        return False
    for m in reply.models:
        if m.model.name == model or (not model and m.is_default):
            if not m.update_fetch:  # over already: finished (installed) or stopped
                return bool(m.last_update.startswith("installed"))
            stage = re.match(r"\w*", m.update_fetch)
            return (stage.group() if stage else "") not in DOWNLOADING
    return False


def _summary(o: pb.UpdateOutcome) -> str:
    if not o.installed:
        return f"{o.model}: {o.plan}"
    share = 100 * o.fetched_bytes / max(o.full_bytes, 1)
    return (
        f"ok: {o.model} v{o.from_version or '?'} -> v{o.to_version} ({o.new_version}) via {o.plan}; "
        f"fetched {mb(o.fetched_bytes)} of {mb(o.full_bytes)} full size ({share:.2f}%)"
    )
