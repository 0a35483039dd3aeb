"""`sidecar load NAME` / `sidecar unload NAME`: load a model now, or unload it by hand.

Models with `load = "on_demand"` load on their first request and unload after
`keep_alive` seconds idle on their own; these commands do it when you choose (to warm a
model before it is needed, or to hand its memory back now). Any configured model can be
unloaded; the next request to it loads it again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sidecar.cli.support import call, client_options, connect, dump
from sidecar.v1 import inference_pb2 as pb

MiB = 1024 * 1024


def _run(ctx: click.Context, rpc: str, name: str, socket: Path | None, tcp: str | None,
         token: str | None, timeout: float, as_json: bool) -> None:  # fmt: skip
    with connect(ctx, socket, tcp, token, timeout) as c:
        method: Any = getattr(c.admin, rpc)
        reply = call(lambda: method(pb.ResidencyRequest(model=name), **c._kw(None)))
    if as_json:
        click.echo(dump(reply))
        return
    m = reply.model
    done = {"Load": "loaded", "Unload": "unloaded"}[rpc]
    what = f"{done} in {reply.seconds:.2f}s" if reply.changed else f"already {done}"
    rss = sum(w.rss_bytes for w in m.workers)
    click.echo(
        f"{m.model.name}@{m.model.version}: {what}; state {m.state}, {len(m.workers)} "
        f"worker(s), RSS {rss / MiB:.0f} MiB"
    )


@click.command("load")
@click.argument("name", default="")
@client_options
@click.pass_context
def load_model(ctx: click.Context, /, name: str, **opts: Any) -> None:
    """Load model NAME (default: the default model) now, and wait until it serves.

    With server.max_model_memory_mb set, idle models are unloaded first (least recently
    used first) to make room. Exit 1 if the load failed or the budget is held by models
    with requests in flight (RESOURCE_EXHAUSTED: retry).
    """
    _run(ctx, "Load", name, **opts)


@click.command("unload")
@click.argument("name", default="")
@client_options
@click.pass_context
def unload_model(ctx: click.Context, /, name: str, **opts: Any) -> None:
    """Unload model NAME: its workers stop and their memory returns to the system.

    The next request to it loads it again (and waits for that). Exit 1 while requests are
    in flight (FAILED_PRECONDITION).
    """
    _run(ctx, "Unload", name, **opts)
