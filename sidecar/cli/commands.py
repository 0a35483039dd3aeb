"""The `sidecar` command: parse, build config, call one function, map failure to an exit code.

Exit codes: 0 ok · 1 the request failed (the daemon's status and message are printed)
· 2 bad configuration or usage · 3 no daemon is answering on the socket · 4 detached: the
client stopped waiting (--timeout) and the work goes on in the daemon (`sidecar status`
follows it) · 5 stopped: the client stopped waiting and the daemon stopped the work (an
update's download; the next apply resumes it) · 130 interrupted (Ctrl-C; swap and update
apply first say which of 4 or 5 happened).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sidecar import __version__
from sidecar.cli.chat import run
from sidecar.cli.evaluate import eval_group
from sidecar.cli.logs import logs
from sidecar.cli.models import models, swap
from sidecar.cli.ps import ps
from sidecar.cli.pull import pull, show
from sidecar.cli.residency import load_model, unload_model
from sidecar.cli.service import service
from sidecar.cli.store_keys import keygen, rekey
from sidecar.cli.support import (
    EXIT_CONFIG,
    EXIT_FAILED,
    call,
    client_options,
    config_from,
    config_option,
    connect,
    dump,
)
from sidecar.cli.update import rollout_line, update
from sidecar.config import Config, Overrides, load, load_client, schema
from sidecar.config.reference import key_line
from sidecar.domain.errors import ConfigError, SidecarError

if TYPE_CHECKING:
    from sidecar.app import App


class _Main(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        # click's own answer to Ctrl-C is "Aborted!" and exit 1, which reads like a failed
        # request; an interrupt is 130, as in every shell.
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Main)
@click.version_option(__version__, prog_name="sidecar")
@click.option(
    "--config",
    type=click.Path(path_type=Path),
    help="Config file (default: the user config dir; clients then try /etc/sidecar/config.toml). "
    "Also accepted after the subcommand.",
)
@click.pass_context
def main(ctx: click.Context, config: Path | None) -> None:
    """sidecar: a local inference daemon (gRPC on a Unix socket)."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = config


# ---------------------------------------------------------------- serve


@main.command()
@click.option("--socket", type=click.Path(path_type=Path), help="Unix socket path.")
@click.option("--model", help="GGUF path, or the name of a configured model, to serve by default.")
@click.option("--workers", type=int, help="Worker processes for the default model.")
@click.option(
    "--threads", type=int, help="Most llama.cpp threads per worker (0 = every usable CPU)."
)
@click.option("--context", type=int, help="Context window (tokens) of the default model.")
@click.option("--tcp-port", type=int, help="Also listen on loopback TCP (needs server.tcp_token).")
@click.option("--store", type=click.Path(path_type=Path), help="Model store directory.")
@click.option(
    "--http-port", type=int, help="OpenAI-compatible HTTP API on loopback (needs http.token)."
)
@click.option(
    "--http-socket",
    type=click.Path(path_type=Path),
    help="OpenAI-compatible HTTP API on this Unix socket.",
)
@click.option("--log-format", type=click.Choice(["text", "json"]))
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option(
    "--in-process",
    is_flag=True,
    help="Run llama.cpp in daemon threads (debugging; no crash isolation).",
)
@click.option("--banner", is_flag=True, help="Print how to call the daemon once it is ready.")
@config_option
@click.pass_context
def serve(ctx: click.Context, /, in_process: bool, banner: bool, **flags: Any) -> None:
    """Run the daemon in the foreground until SIGTERM/SIGINT."""
    from sidecar.app import serve as run_daemon
    from sidecar.logs import configure
    from sidecar.notify import Notifier
    from sidecar.socket_claim import SocketBusy

    config = config_from(ctx, **flags)
    configure(config.log.level, config.log.format)
    if not config.models:
        click.echo(
            "error: no model configured: pass --model PATH or add a [models.NAME] table", err=True
        )
        sys.exit(EXIT_CONFIG)

    def ready(running: App) -> None:
        if banner:
            click.echo(_banner(config, running), err=True)

    try:
        code = asyncio.run(
            run_daemon(
                config,
                "thread" if in_process else "process",
                ready,
                reload=lambda: load(Overrides(config=ctx.obj.get("config"), **flags)),
                # systemd's protocol variables; everything else comes through config.load.
                notifier=Notifier.from_env(os.environ),
            )
        )
    except SocketBusy as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_FAILED)
    except SidecarError as e:
        click.echo(f"error: {e.message}", err=True)
        sys.exit(EXIT_FAILED)
    sys.exit(code)


def _banner(config: Config, running: App) -> str:
    sock = config.server.socket
    names = ", ".join(m.name for m in config.models)
    lines = [
        f"sidecar {__version__} is serving {names} on unix:{sock}",
        "",
        "Try it from another terminal:",
        f"  .venv/bin/sidecar classify --socket {sock} 'I think someone stole my card' \\",
        "      -l lost_or_stolen_card -l card_arrival -l exchange_rate",
        f"  .venv/bin/sidecar generate --socket {sock} --stream --max-tokens 32 "
        "--stop $'\\n' 'The capital of France is'",
        f"  .venv/bin/sidecar status --socket {sock}",
        f"  grpcurl -plaintext -unix {sock} list      # any gRPC tool, via reflection",
    ]
    if running.grpc.tcp_port:
        lines.append(f"  (also on 127.0.0.1:{running.grpc.tcp_port}, bearer token required)")
    if running.http is not None:
        if running.http.socket:
            lines.append(
                f"  OpenAI-compatible API: curl --unix-socket {running.http.socket} http://x/v1/models"
            )
        if running.http.port:
            lines.append(
                f"  OpenAI-compatible API: base_url=http://{config.http.host}:{running.http.port}/v1 (api_key = http.token)"
            )
    lines.append("Stop with Ctrl-C (drains in-flight requests first).")
    return "\n".join(lines)


@main.command("config")
@click.option("--keys", is_flag=True, help="List every config key with its default and meaning.")
@config_option
@click.pass_context
def showconfig_from(ctx: click.Context, keys: bool) -> None:
    """Show the effective configuration (defaults < TOML < env < flags)."""
    if keys:
        for spec in schema.each_key():
            click.echo(key_line(spec))
        return
    config = config_from(ctx)
    click.echo(f"source: {config.source or '(defaults and environment only)'}")
    click.echo(f"socket: {config.server.socket}")
    try:  # a client with no user config reads the system one: say where `status` would look
        view = load_client(Overrides(config=ctx.obj.get("config")))
        click.echo(f"clients look at: {view.socket}" + (f" ({view.source})" if view.source else ""))
    except ConfigError as e:
        click.echo(f"clients: error: {e}")
    click.echo(f"default_model: {config.default_model or '(none)'}")
    for m in config.models:
        click.echo(
            f"model {m.name}: {m.path} workers={m.workers} threads={m.threads} context={m.context}"
        )


# ---------------------------------------------------------------- client commands


def _stream_out(chunks: Iterator[Any], as_json: bool) -> None:
    def consume() -> None:
        for c in chunks:
            if c.HasField("summary"):
                if as_json:
                    click.echo(dump(c.summary))
                else:
                    s = c.summary
                    click.echo(f"\n[{s.model.name}@{s.model.version} {s.usage.completion_tokens} tokens "
                               f"{s.timings.total_ms:.0f} ms]", err=True)  # fmt: skip
            elif not as_json:
                click.echo(c.text, nl=False)

    call(consume)


@main.command()
@client_options
@click.pass_context
def status(
    ctx: click.Context,
    socket: Path | None,
    tcp: str | None,
    token: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """What the daemon serves: models, versions, workers, queues, counters."""
    with connect(ctx, socket, tcp, token, timeout) as c:
        reply = call(c.status)
        health = call(lambda: c.health("sidecar.v1.Inference"))
    if as_json:
        click.echo(dump(reply))
        return
    mib = 1024 * 1024
    click.echo(
        f"sidecar {reply.version} pid {reply.pid} up {reply.uptime_s:.0f}s on {reply.socket} "
        f"({health}); {reply.memory_available_bytes // mib} MiB memory available"
    )
    _lines("  ", ("last reload", reply.last_reload), ("SHEDDING LOAD", reply.shedding),
           ("drop folder", reply.drop_watcher))  # fmt: skip
    for m in reply.models:
        mark = " (default)" if m.is_default else ""
        state = "ready" if m.ready else f"NOT READY: {m.detail}"
        click.echo(
            f"  {m.model.name}@{m.model.version}{mark}: {state}; context {m.context}, "
            f"queue {m.queue_depth}/{m.queue_limit}, {m.restarts} restarts; {m.path}"
        )
        if m.last_error:
            click.echo(f"    last error: {m.last_error} (restart backoff {m.backoff_s:.1f}s)")
        staged = m.HasField("rollout") and m.rollout.fraction < 1
        rollout = rollout_line(m.rollout) if staged else ""
        _lines("    ", ("last swap", m.last_swap), ("update in progress", m.update_fetch),
               ("last update", m.last_update), ("rollout", rollout),
               ("last rollback", m.last_rollback))  # fmt: skip
        for a in m.adapters:
            fits = f": DOES NOT FIT {m.model.name}@{m.model.version}" if a.not_fitting else ""
            click.echo(f"    adapter {a.name}@{a.version}{fits}")
            if a.not_fitting:
                click.echo(f"      {a.not_fitting} (requests for it fail; add a version made "
                           f"for this model with `sidecar models add --adapter-for "
                           f"{m.model.name} FILE --name {a.name}`)")  # fmt: skip
            _lines("      ", ("last update", a.last_update),
                   ("last rollback", a.last_rollback))  # fmt: skip
        for w in m.workers:
            click.echo(
                f"    worker pid {w.pid}: {w.state}, {w.requests} requests, "
                f"{w.rss_bytes // mib} MiB RSS"
            )
    cloud = reply.cloud
    if cloud.configured:
        caps = "/".join(f"{c:g}" if c else "no cap" for c in (cloud.daily_cap, cloud.monthly_cap))
        click.echo(
            f"  cloud {cloud.model} at {cloud.base_url}: routing {cloud.routing}, breaker "
            f"{cloud.breaker}, spent {cloud.spent_day:.4f} today / {cloud.spent_month:.4f} this "
            f"month (caps {caps}), {cloud.calls} calls"
        )
    else:
        click.echo("  cloud: not configured (everything is answered locally)")
    for name, state in sorted(cloud.tasks.items()):
        click.echo(f"  task {name}: {state}")
    for name, fit in sorted(cloud.fitted_thresholds.items()):
        click.echo(f"  threshold {name}: {fit}")
    if cloud.HasField("shadow") and (cloud.shadow.rate or cloud.shadow.agreement):
        _shadow_lines(cloud.shadow)
    for k, v in sorted(reply.counters.items()):
        click.echo(f"  {k}: {v}")


def _shadow_lines(sh: Any) -> None:
    counts = ", ".join(f"{n} {k}" for k, n in sorted(sh.counts.items()))
    cap = f"{sh.daily_cap:g}" if sh.daily_cap else "no cap"
    click.echo(f"  shadow: rate {sh.rate:g}, spent {sh.spent_day:.4f} today / "
               f"{sh.spent_month:.4f} this month (cap {cap}); {counts or 'no calls'}")  # fmt: skip
    for a in sh.agreement:
        rate = a.agreed / a.total if a.total else float("nan")
        click.echo(f"  agreement {a.key} ({a.model}): {rate:.3f} [{a.low:.3f}, {a.high:.3f}] "
                   f"of {a.total}")  # fmt: skip
    for name, chosen in sorted(sh.recalibrated.items()):
        click.echo(f"  recalibrated threshold {name}: {chosen}")


@main.command()
@click.argument("prompt")
@click.option("--model", default="", help="Model name (default: the daemon's default).")
@click.option("--max-tokens", type=int, default=None, help="Default: the server default.")
@click.option("--temperature", type=float, default=0.0, help="0 = greedy (deterministic).")
@click.option("--stop", multiple=True, help="Stop sequence (repeatable).")
@click.option("--stream", is_flag=True, help="Print tokens as they come.")
@client_options
@click.pass_context
def generate(ctx: click.Context, prompt: str, model: str, max_tokens: int | None, temperature: float, stop: tuple[str, ...],
             stream: bool, socket: Path | None, tcp: str | None, token: str | None, timeout: float, as_json: bool) -> None:  # fmt: skip
    """Continue a raw prompt."""
    kw = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "stop": stop}
    with connect(ctx, socket, tcp, token, timeout) as c:
        if stream:
            _stream_out(c.generate_stream(prompt, **kw), as_json)
            return
        reply = call(lambda: c.generate(prompt, **kw))
    click.echo(dump(reply) if as_json else reply.text)


@main.command()
@click.argument("message")
@click.option("--system", default="", help="System message.")
@click.option("--model", default="")
@click.option("--max-tokens", type=int, default=None)
@click.option("--temperature", type=float, default=0.0)
@click.option("--stream", is_flag=True)
@client_options
@click.pass_context
def chat(ctx: click.Context, message: str, system: str, model: str, max_tokens: int | None, temperature: float, stream: bool,
         socket: Path | None, tcp: str | None, token: str | None, timeout: float, as_json: bool) -> None:  # fmt: skip
    """One chat turn, using the model's chat template."""
    messages = ([("system", system)] if system else []) + [("user", message)]
    kw = {"model": model, "max_tokens": max_tokens, "temperature": temperature}
    with connect(ctx, socket, tcp, token, timeout) as c:
        if stream:
            _stream_out(c.chat_stream(messages, **kw), as_json)
            return
        reply = call(lambda: c.chat(messages, **kw))
    click.echo(dump(reply) if as_json else reply.text)


ROUTINGS = ("AUTO", "LOCAL_ONLY", "CLOUD_ONLY")


@main.command()
@click.argument("text")
@click.option(
    "-l",
    "--label",
    "labels",
    multiple=True,
    help="Candidate label (repeat, 2 or more; with --task, narrows its labels).",
)
@click.option(
    "--task", default="", help="Classify by the examples of a [tasks.NAME] in the config."
)
@click.option(
    "--routing", type=click.Choice(ROUTINGS), default=None, help="Default: cloud.routing."
)
@click.option(
    "--allow-none",
    is_flag=True,
    help="Accept 'none of these': a text like none of the labels gets no label.",
)
@click.option("--instruction", default="")
@click.option("--model", default="")
@client_options
@click.pass_context
def classify(ctx: click.Context, text: str, labels: tuple[str, ...], task: str, routing: str | None,
             allow_none: bool, instruction: str, model: str, socket: Path | None, tcp: str | None,
             token: str | None, timeout: float, as_json: bool) -> None:  # fmt: skip
    """Pick exactly one of the given labels (or of a task's labels) for TEXT; with
    --allow-none, possibly none (an empty line, and "out of scope")."""
    with connect(ctx, socket, tcp, token, timeout) as c:
        reply = call(lambda: c.classify(text, labels, instruction=instruction, model=model,
                                        task=task, routing=routing or "",
                                        allow_none=allow_none))  # fmt: skip
    if as_json:
        click.echo(dump(reply))
        return
    click.echo(reply.label)
    for s in reply.scores[:10]:
        click.echo(f"  {s.probability:6.3f}  {s.label}", err=True)
    if reply.out_of_scope or reply.HasField("novelty"):
        novelty = f"novelty {reply.novelty:.3f}" if reply.HasField("novelty") else "novelty unset"
        scope = "out of scope" if reply.out_of_scope else "in scope"
        click.echo(f"  {scope} ({novelty})", err=True)
    if reply.route.served_by == "cloud" or reply.route.reason:
        click.echo(f"  answered by {reply.route.served_by}: {reply.route.reason}", err=True)


@main.command()
@click.argument("text")
@click.option("--schema", required=True, help="JSON Schema as JSON text, or @FILE.")
@click.option("--instruction", default="")
@click.option("--model", default="")
@click.option("--max-tokens", type=int, default=None)
@client_options
@click.pass_context
def extract(ctx: click.Context, text: str, schema: str, instruction: str, model: str, max_tokens: int | None,
            socket: Path | None, tcp: str | None, token: str | None, timeout: float, as_json: bool) -> None:  # fmt: skip
    """JSON from TEXT that validates against a JSON Schema."""
    if schema.startswith("@"):
        schema = Path(schema[1:]).read_text()
    with connect(ctx, socket, tcp, token, timeout) as c:
        reply = call(
            lambda: c.extract(
                text, schema, instruction=instruction, model=model, max_tokens=max_tokens
            )
        )
    click.echo(dump(reply) if as_json else reply.json)


@main.command()
@click.argument("texts", nargs=-1, required=True)
@click.option("--normalize", is_flag=True, help="Unit-length vectors.")
@click.option("--model", default="")
@client_options
@click.pass_context
def embed(ctx: click.Context, texts: tuple[str, ...], normalize: bool, model: str,
          socket: Path | None, tcp: str | None, token: str | None, timeout: float, as_json: bool) -> None:  # fmt: skip
    """One vector per TEXT."""
    with connect(ctx, socket, tcp, token, timeout) as c:
        reply = call(lambda: c.embed(list(texts), normalize=normalize, model=model))
    if as_json:
        click.echo(dump(reply))
        return
    for text, e in zip(texts, reply.embeddings, strict=True):
        head = ", ".join(f"{v:.4f}" for v in e.values[:4])
        click.echo(f"{len(e.values)} dims [{head}, ...]  {text[:40]}")


main.add_command(service)
main.add_command(swap)
models.add_command(keygen)
models.add_command(rekey)
main.add_command(models)
main.add_command(update)
main.add_command(load_model)
main.add_command(unload_model)
main.add_command(pull)
main.add_command(show)
main.add_command(run)
main.add_command(ps)
main.add_command(logs)
main.add_command(eval_group)


def _lines(indent: str, *fields: tuple[str, str]) -> None:
    """`label: value` for each field that has a value (status shows only what is set)."""
    for label, value in fields:
        if value:
            click.echo(f"{indent}{label}: {value}")


if __name__ == "__main__":  # pragma: no cover
    main()
