"""`sidecar logs [-f]`: the daemon's recent log lines, read through the daemon.

Through the daemon rather than a file or the journal, so it reads the same under systemd,
launchd or a terminal: the daemon keeps its last lines (about a thousand) in memory,
formatted as its log is (log.format). `-f` then prints each new line as it is logged
until Ctrl-C; a follower too slow for the log is told how many lines it missed.
"""

from __future__ import annotations

from pathlib import Path

import click

from sidecar.cli.support import call, client_options, connect, dump_line
from sidecar.v1 import inference_pb2 as pb


@click.command()
@click.option("-n", "--lines", type=click.IntRange(min=0), default=0,
              help="Only the last N lines (default: all the daemon keeps).")  # fmt: skip
@click.option(
    "-f", "--follow", is_flag=True, help="Then print new lines as they come (Ctrl-C ends)."
)
@client_options
@click.pass_context
def logs(ctx: click.Context, lines: int, follow: bool, socket: Path | None, tcp: str | None,
         token: str | None, timeout: float, as_json: bool) -> None:  # fmt: skip
    """The daemon's recent log lines, as it formats them (-f: follow)."""
    with connect(ctx, socket, tcp, token, timeout) as c:
        request = pb.LogsRequest(lines=lines, follow=follow)
        # Following has no deadline: it ends when the user does (Ctrl-C: 130).
        stream = c.admin.Logs(request, metadata=c._md, timeout=None if follow else timeout)

        def each() -> None:
            for line in stream:
                if line.dropped:
                    click.echo(f"... {line.dropped} lines missed (the log ran ahead)", err=True)
                click.echo(dump_line({"text": line.text, "dropped": line.dropped}) if as_json
                           else line.text)  # fmt: skip

        try:
            call(each)
        except KeyboardInterrupt:
            stream.cancel()
            raise
