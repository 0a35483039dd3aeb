"""`sidecar run [NAME]`: chat with a model through the daemon.

On a terminal it is an interactive chat: each turn is sent with the conversation so far
(the model's chat template applies), the reply streams as it is generated, and the line
editor keeps a history of what was typed (readline: arrow keys, Ctrl-R). Ctrl-D (or
/bye) ends it with 0; Ctrl-C ends it with 130, as everywhere in the CLI. Anywhere else
(a pipe, a file) the whole of stdin is one prompt and the reply is printed once.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import click
import grpc

from sidecar.cli.support import EXIT_CONFIG, EXIT_FAILED, client_options, connect, dump

HELP = "/clear forgets the conversation, /bye (or Ctrl-D) ends it, Ctrl-C stops."
PROMPT = ">>> "


def _reply(c: Any, model: str, messages: list[dict[str, str]], opts: dict[str, Any]) -> str:
    """Stream one reply to stdout; the whole text, for the history."""
    parts: list[str] = []
    stream = c.chat_stream(messages, model=model, max_tokens=opts["max_tokens"],
                           temperature=opts["temperature"], timeout=None)  # fmt: skip
    try:
        for chunk in stream:
            if chunk.text:
                parts.append(chunk.text)
                click.echo(chunk.text, nl=False)
    except KeyboardInterrupt:
        stream.cancel()  # the daemon stops generating at once
        click.echo()
        raise
    click.echo()
    return "".join(parts)


def _interactive(c: Any, model: str, messages: list[dict[str, str]], opts: dict[str, Any]) -> None:
    with contextlib.suppress(ImportError):  # not on every platform; input() works without
        import readline  # noqa: F401 - input() gains line editing and history
    base = list(messages)  # the system prompt survives /clear
    click.echo(HELP, err=True)
    while True:
        try:
            line = input(PROMPT)
        except EOFError:  # Ctrl-D
            click.echo()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/bye", "/exit", "/quit"):
            return
        if text == "/clear":
            messages[:] = base
            click.echo("(conversation cleared)", err=True)
            continue
        if text.startswith("/") and text.split()[0] in ("/help", "/?"):
            click.echo(HELP, err=True)
            continue
        messages.append({"role": "user", "content": line})
        try:
            answer = _reply(c, model, messages, opts)
        except grpc.RpcError as e:  # this turn failed; the conversation goes on without it
            messages.pop()
            click.echo(f"error: {e.code().name}: {e.details()}", err=True)
            continue
        messages.append({"role": "assistant", "content": answer})


@click.command()
@click.argument("model", default="")
@click.option("--system", default="", help="A system prompt for the conversation.")
@click.option("--max-tokens", type=int, default=None, help="Longest reply (default: the daemon's).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@client_options
@click.pass_context
def run(ctx: click.Context, /, model: str, system: str, max_tokens: int | None,
        temperature: float, socket: Path | None, tcp: str | None, token: str | None,
        timeout: float, as_json: bool) -> None:  # fmt: skip
    """Chat with MODEL (default: the daemon's default model).

    On a terminal: an interactive chat with history; each reply streams as it comes.
    Otherwise stdin is read whole as one prompt and the reply printed (--json: the reply
    as JSON).
    """
    opts = {"max_tokens": max_tokens, "temperature": temperature}
    messages = [{"role": "system", "content": system}] if system else []
    tty = sys.stdin.isatty()
    prompt = "" if tty else sys.stdin.read()
    if not tty and not prompt.strip():
        click.echo("error: nothing to send: stdin is empty (or run it on a terminal)", err=True)
        sys.exit(EXIT_CONFIG)
    with connect(ctx, socket, tcp, token, timeout) as c:
        try:
            if tty:
                _interactive(c, model, messages, opts)
                return
            messages.append({"role": "user", "content": prompt})
            if as_json:
                reply = c.chat(messages, model=model, max_tokens=max_tokens,
                               temperature=temperature)  # fmt: skip
                click.echo(dump(reply))
                return
            _reply(c, model, messages, opts)
        except grpc.RpcError as e:
            click.echo(f"error: {e.code().name}: {e.details()}", err=True)
            sys.exit(EXIT_FAILED)
