"""`sidecar service ...`: parse, call sidecar.service_units, print, map failure to an exit code.

Exit codes: 0 ok · 1 the install/uninstall failed, or install refused a unit whose paths the
sandbox would hide from the service (message printed) · 2 usage (click) · 3 `status`: the
service is not installed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from sidecar import service_units as svc
from sidecar.domain.errors import SidecarError

EXIT_FAILED = 1
EXIT_NOT_INSTALLED = 3
NAMES = {"system": "systemd system unit", "user": "systemd user unit", "launchd": "launchd agent"}


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--root",
        type=click.Path(file_okay=False, path_type=Path),
        default="/",
        hidden=True,  # tests install into a temporary directory
    )(f)
    help_user = "Per-user service (systemctl --user). launchd agents are always per-user."
    return click.option("--user", is_flag=True, help=help_user)(f)


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_FAILED)


def _write_error(path: Path | str, e: OSError, user: bool) -> str:
    hint = "" if user else " (run as root, or use --user for a per-user service)"
    return f"cannot write {path}: {e.strerror or e}{hint}"


@click.group("service")
def service() -> None:
    """Run the daemon under systemd (Linux) or launchd (macOS)."""


@service.command()
@_common
@click.option("--dry-run", is_flag=True, help="Print the file instead of writing it.")
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Config file the service reads (default: /etc/sidecar/config.toml for the system "
    "unit, the user config file otherwise).",
)
@click.option("--socket", type=click.Path(path_type=Path), help="Socket the service listens on.")
@click.pass_context
def install(
    ctx: click.Context,
    user: bool,
    root: Path,
    dry_run: bool,
    config: Path | None,
    socket: Path | None,
) -> None:
    """Write the unit (or plist) for this machine with this installation's paths."""
    # `sidecar --config PATH service install` works too: the main group keeps it in obj.
    config = config or (ctx.find_object(dict) or {}).get("config")
    try:
        plan = svc.plan_install(user, root=root, env=os.environ, config=config, socket=socket)
    except SidecarError as e:
        _fail(e.message)
    if plan.hidden and not dry_run:
        # A unit that cannot start is worse than none: it fails later, in the journal.
        for problem in plan.hidden:
            click.echo(f"error: {problem}", err=True)
        _fail(
            f"nothing written to {plan.path}: the service could not start. "
            "`--dry-run` prints the unit if you mean to edit it by hand"
        )
    if not dry_run:
        try:
            svc.install(plan)
        except OSError as e:
            _fail(_write_error(plan.path, e, user))
    if dry_run:
        click.echo(plan.text, nl=False)
        click.echo(f"# would write {plan.path}", err=True)
    else:
        click.echo(f"wrote {NAMES[plan.kind]} {plan.path}")
    for problem in plan.hidden:
        click.echo(f"warning: {problem}", err=True)
    for note in plan.notes:
        click.echo(f"note: {note}", err=True)
    click.echo("next:", err=dry_run)
    for step in plan.next_steps:
        click.echo(f"  {step}", err=dry_run)


@service.command()
@_common
def uninstall(user: bool, root: Path) -> None:
    """Remove the unit (or plist) and its enablement link."""
    try:
        removed, steps = svc.uninstall(user, root=root, env=os.environ)
    except SidecarError as e:
        _fail(e.message)
    except OSError as e:
        _fail(_write_error(e.filename or "the service file", e, user))
    for p in removed:
        click.echo(f"removed {p}")
    if not removed:
        click.echo("nothing to remove: the service is not installed")
    click.echo("next:")
    for step in steps:
        click.echo(f"  {step}")


@service.command()
@_common
def status(user: bool, root: Path) -> None:
    """Whether the unit is installed and what the service manager says about it.

    Exits 0 when it is installed (whatever its state), 3 when it is not."""
    try:
        st = svc.status(user, root=root, env=os.environ)
    except SidecarError as e:
        _fail(e.message)
    click.echo(f"{NAMES[st.kind]}: {st.path} ({'installed' if st.installed else 'not installed'})")
    manager = "launchctl" if st.kind == "launchd" else "systemctl"
    click.echo(f"{manager}: {st.state if st.state is not None else 'not available here'}")
    if st.installed:
        return
    how = {"system": "sudo sidecar service install", "user": "sidecar service install --user"}
    click.echo(
        f"not installed: `{how.get(st.kind, 'sidecar service install')}` writes it", err=True
    )
    if st.elsewhere is not None:
        other, flag = ("system", "") if user else ("per-user", " --user")
        click.echo(
            f"a {other} unit is installed instead ({st.elsewhere}): `sidecar service status{flag}`",
            err=True,
        )
    sys.exit(EXIT_NOT_INSTALLED)
