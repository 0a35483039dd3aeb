"""`sidecar models keygen` and `sidecar models rekey`: the encrypted store's keys.

These work on the store's files, not through the daemon: a key never travels over the
socket. `rekey` is safe beside a running daemon that was given both keys (see
sidecar.store.rekey and docs/encryption.md).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from sidecar.cli.support import EXIT_CONFIG, EXIT_FAILED, config_from, config_option
from sidecar.domain.errors import SidecarError


@click.command("keygen")
@click.option(
    "-o",
    "--output",
    "output",
    type=click.Path(path_type=Path),
    required=True,
    help="Where to write the new key (mode 0600; never over an existing file).",
)
def keygen(output: Path) -> None:
    """Make a new store key (32 random bytes as hex) and print its key id."""
    from sidecar.store.keys import write_new_key

    try:
        kid = write_new_key(output)
    except SidecarError as e:
        click.echo(f"error: {e.message}", err=True)
        sys.exit(EXIT_FAILED)
    click.echo(f"wrote key {kid} to {output}")


@click.command("rekey")
@click.option(
    "--new-key",
    type=click.Path(path_type=Path),
    help="Seal every blob with this key file; the configured keys read the old ones. "
    "Default: the configured store key (blobs under store.previous_key_file move to it).",
)
@config_option
@click.pass_context
def rekey(ctx: click.Context, /, new_key: Path | None) -> None:
    """Re-seal every blob of the store with one key, one blob at a time (crash-safe)."""
    from sidecar.store import ModelStore
    from sidecar.store.keys import Keyring, load_keyring, read_key_file
    from sidecar.store.rekey import rekey as run

    config = config_from(ctx)
    cfg = config.store
    try:
        keys = load_keyring(True, cfg.key_file, cfg.previous_key_file, cfg.key, os.environ)
        assert keys is not None
        if new_key is not None:
            keys = Keyring(read_key_file(new_key, "--new-key"), (keys.current, *keys.older))
        store = ModelStore(cfg.path, keys, encrypt=True)
    except SidecarError as e:
        click.echo(f"error: {e.message}", err=True)
        sys.exit(EXIT_CONFIG)
    click.echo(f"sealing every blob of {cfg.path} with key {keys.current_id}")
    report = run(store, lambda m: click.echo(f"  {m}"))
    click.echo(
        f"{len(report.resealed)} resealed, {report.already} already under "
        f"{keys.current_id}, {len(report.failed)} failed"
    )
    if report.failed:
        sys.exit(EXIT_FAILED)
