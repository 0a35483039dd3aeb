"""`sidecar ps`: what is loaded now, one line per model and one per worker.

Read from Status. Fields a daemon may not report (load on demand: `state`, `idle_s`,
`unload_in_s`, `in_flight`) show as "-" when its Status has no such field, so this command
works against an older daemon too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sidecar.cli.support import call, client_options, connect, dump

COLUMNS = ("NAME", "VERSION", "STATE", "WORKERS", "RSS", "QUEUE", "IN FLIGHT", "IDLE", "UNLOADS IN")


def _field(m: Any, name: str) -> Any:
    """`m.name` when this daemon's Status has that field, else None."""
    return getattr(m, name) if name in m.DESCRIPTOR.fields_by_name else None


def _seconds(s: float | None) -> str:
    if s is None or s < 0:
        return "-"
    s = int(s)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def row(m: Any) -> tuple[str, ...]:
    """One model's line of the table."""
    workers = list(m.workers)
    busy = sum(1 for w in workers if w.state == "busy")
    in_flight = _field(m, "in_flight")
    state = _field(m, "state")
    state = (f"{state}, not ready" if state and not m.ready else state) or (
        "ready" if m.ready else "not ready"
    )
    idle, unload = _field(m, "idle_s"), _field(m, "unload_in_s")
    return (
        m.model.name + ("*" if m.is_default else ""),
        m.model.version or "-",
        str(state),
        str(len(workers)),
        _mib(sum(w.rss_bytes for w in workers)) if workers else "-",
        f"{m.queue_depth}/{m.queue_limit}",
        str(in_flight if in_flight is not None else busy),
        _seconds(idle) if idle is not None and (in_flight or busy) == 0 else "-",
        _seconds(unload) if unload is not None and unload >= 0 else "-",
    )


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)  # fmt: skip


@click.command()
@click.option("--workers", "show_workers", is_flag=True, help="Also one line per worker process.")
@client_options
@click.pass_context
def ps(ctx: click.Context, show_workers: bool, socket: Path | None, tcp: str | None,
       token: str | None, timeout: float, as_json: bool) -> None:  # fmt: skip
    """What is loaded now: per model its version, state, workers, their RSS, queue,
    requests in flight, idle time and when it unloads (* = the default model)."""
    with connect(ctx, socket, tcp, token, timeout) as c:
        reply = call(lambda: c.status(timeout=timeout))
    if as_json:
        click.echo(dump({"models": [dump_model(m) for m in reply.models]}))
        return
    rows = [COLUMNS, *(row(m) for m in reply.models)]
    click.echo(table(rows))
    if show_workers:
        for m in reply.models:
            for w in m.workers:
                click.echo(f"  {m.model.name} pid {w.pid}: {w.state}, {_mib(w.rss_bytes)}, "
                           f"{w.requests} requests served")  # fmt: skip


def dump_model(m: Any) -> dict[str, Any]:
    busy = sum(1 for w in m.workers if w.state == "busy")
    out: dict[str, Any] = {
        "name": m.model.name,
        "version": m.model.version,
        "default": m.is_default,
        "ready": m.ready,
        "workers": [
            {"pid": w.pid, "state": w.state, "rss_bytes": w.rss_bytes, "requests": w.requests}
            for w in m.workers
        ],
        "rss_bytes": sum(w.rss_bytes for w in m.workers),
        "queue_depth": m.queue_depth,
        "queue_limit": m.queue_limit,
        "in_flight": busy,
    }
    for name in ("state", "idle_s", "unload_in_s", "in_flight"):
        value = _field(m, name)
        if value is not None:
            out[name] = value
    return out
