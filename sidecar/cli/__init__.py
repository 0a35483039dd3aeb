"""The `sidecar` command: a thin click layer over the client, the store and the daemon."""

from sidecar.cli.commands import main

__all__ = ["main"]
