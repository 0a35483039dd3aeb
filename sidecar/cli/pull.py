"""`sidecar pull NAME` and `sidecar show NAME[@VERSION]|PATH`.

Pulling by name reuses what updates already trust: the origin holds NAME.manifest.json,
signed; the manifest is verified with the configured key before anything else is read, the
full file is fetched resumably (a cut or Ctrl-C keeps the partial file; the next pull
resumes it) and checked against the manifest's sha256, and the daemon adds it to the store
(one writer of the store). NAME's origin and key: models.NAME.update_origin and
update_key when the config has them, else the catalog (update.catalog_origin and
update.catalog_key).

`show` reads the GGUF header (sidecar.gguf_check: bounded, nothing loaded) and prints what
the file says about itself.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
import grpc
import platformdirs

from sidecar.cli.progress import ProgressDisplay, mb
from sidecar.cli.support import (
    EXIT_CONFIG,
    EXIT_FAILED,
    client_options,
    config_from,
    connect,
    dump,
)
from sidecar.config import Config
from sidecar.domain.names import name_problem
from sidecar.fileio import sha256_file

if TYPE_CHECKING:
    from sidecar.gguf_check import GGUFInfo

MANIFEST_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class Source:
    origin: str
    key: str
    where: str  # the config keys it came from, for messages


def source(config: Config, name: str) -> Source | None:
    """Where NAME is pulled from: its own update origin, else the catalog; None: nowhere."""
    m = config.model(name)
    if m is not None and m.update_origin and m.update_key:
        return Source(m.update_origin, m.update_key, f"models.{name}.update_origin")
    u = config.update
    if u.catalog_origin and u.catalog_key:
        return Source(u.catalog_origin, u.catalog_key, "update.catalog_origin")
    return None


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _public_key(src: Source) -> Any:
    from sidecar.update.manifest import parse_public_key

    text = src.key.strip()
    if not text.startswith("ed25519:"):  # a file holding it, as for update_key
        try:
            text = Path(text).expanduser().read_text().strip()
        except OSError as e:
            _fail(f"the key for {src.where}: cannot read {src.key}: {e}", EXIT_CONFIG)
    try:
        return parse_public_key(text)
    except ValueError as e:
        return _fail(f"the key for {src.where}: {e}", EXIT_CONFIG)


def _manifest(src: Source, name: str, config: Config) -> Any:
    """NAME's manifest from the origin, verified (signature, name, expiry) or refused."""
    from sidecar.update import fetch
    from sidecar.update.manifest import UpdateRejected, verify

    url = fetch.origin_url(src.origin, f"{name}.manifest.json")
    public = _public_key(src)
    try:
        data = fetch.fetch_bytes(
            url, max_bytes=MANIFEST_MAX_BYTES, timeout=config.update.timeout_seconds
        )
        return verify(data, public, name=name, installed_version=None)
    except UpdateRejected as e:
        return _fail(f"refused {name!r} from {src.origin}: {e.message}")
    except fetch.FetchError as e:
        return _fail(f"{name!r} is not in the catalog at {src.origin} ({src.where}): {e}")


def _download(src: Source, manifest: Any, into: Path, config: Config) -> Path:
    """The full file, resumed from a partial one when there is one; its sha256 checked."""
    from sidecar.update import fetch
    from sidecar.update.manifest import UpdateRejected

    into.mkdir(parents=True, exist_ok=True)
    partial = into / f"{manifest.name}-{manifest.sha256[:16]}.gguf.partial"
    done = partial.with_name(partial.name.removesuffix(".partial"))
    if done.is_file() and sha256_file(done) == manifest.sha256:
        click.echo(f"using the download already in {done}", err=True)
        return done  # a pull whose add failed (say, the daemon could not read it) left it
    url = fetch.origin_url(src.origin, manifest.full.path)
    bar = ProgressDisplay()
    had = partial.stat().st_size if partial.exists() else 0
    if had:
        click.echo(f"resuming at {mb(had)} of {mb(manifest.size)}", err=True)
    control = fetch.Control(None, config.update.fetch_min_bytes_per_second)
    try:
        fetch.fetch_file(
            url,
            partial,
            size=manifest.size,
            sha256=manifest.sha256,
            timeout=config.update.timeout_seconds,
            retries=config.update.retries,
            progress=lambda done, total: bar.show("downloading", manifest.name, done, total),
            control=control,
        )
    except KeyboardInterrupt:
        bar.end()
        click.echo(f"the partial download stays in {partial}; pull again to resume it", err=True)
        raise
    except UpdateRejected as e:
        bar.end()
        _fail(f"refused the download: {e.message}")
    except fetch.FetchError as e:
        bar.end()
        _fail(f"{e}; the partial download stays in {partial} and the next pull resumes it")
    bar.end()
    partial.replace(done)
    return done


def _stored(c: Any, name: str, sha: str) -> bool:
    return any(v.model == name and v.sha256 == sha for v in c.list_versions().versions)


def _check_name(name: str) -> str:
    problem = name_problem(name)
    if problem:
        raise click.BadParameter(problem, param_hint="NAME")
    return name


@click.command()
@click.argument("name")
@click.option("--serve", "serve_it", is_flag=True, help="Then swap it in (NAME must be served).")
@click.option(
    "--dir",
    "into",
    type=click.Path(file_okay=False, path_type=Path),
    help="Download here (default: the user cache dir); the daemon must be able to read it.",
)
@client_options
@click.pass_context
def pull(ctx: click.Context, name: str, serve_it: bool, into: Path | None, socket: Path | None,
         tcp: str | None, token: str | None, timeout: float, as_json: bool) -> None:  # fmt: skip
    """Download model NAME from the configured catalog into the daemon's store.

    The signed manifest NAME.manifest.json is verified with the configured key (refused:
    a bad signature, another model's manifest, an expired one), the file is fetched with a
    progress bar, resumably (Ctrl-C or a cut keeps the partial file; pull again resumes
    it), its sha256 is checked, and the daemon adds it to the store. With --serve, the
    daemon then hot-swaps NAME to it.

    NAME's origin and key: models.NAME.update_origin and update_key, else
    update.catalog_origin and update.catalog_key.
    """
    _check_name(name)
    config = config_from(ctx)
    src = source(config, name)
    if src is None:
        _fail(
            f"no catalog to pull {name!r} from: set update.catalog_origin and "
            f"update.catalog_key (or models.{name}.update_origin and update_key)",
            EXIT_CONFIG,
        )
    manifest = _manifest(src, name, config)
    version = manifest.sha256[:12]
    with connect(ctx, socket, tcp, token, timeout) as c:
        try:
            already = _stored(c, name, manifest.sha256)
            if already:
                click.echo(f"{name}@{version} (v{manifest.version}) is in the store already",
                           err=True)  # fmt: skip
            else:
                click.echo(f"pulling {name} v{manifest.version} ({version}, {mb(manifest.size)}) "
                           f"from {src.origin}", err=True)  # fmt: skip
                file = _download(src, manifest, into or _cache_dir(), config)
                try:
                    c.add_model(file, name=name)
                except grpc.RpcError:
                    # Kept, verified: the next pull adds it without downloading again.
                    click.echo(f"the download stays in {file}", err=True)
                    raise
                file.unlink(missing_ok=True)  # the store holds its own copy
        except grpc.RpcError as e:
            hint = ""
            if "ermission denied" in (e.details() or ""):
                hint = " (the daemon cannot read the download: pass --dir a folder it can read)"
            _fail(f"{e.code().name}: {e.details()}{hint}")
        if serve_it:
            try:
                c.swap(name, version=manifest.sha256, on_progress=_swap_step)
            except grpc.RpcError as e:
                _fail(f"{name}@{version} is in the store, but it does not serve: "
                      f"{e.code().name}: {e.details()}")  # fmt: skip
    if as_json:
        click.echo(dump({"model": name, "version": version, "sha256": manifest.sha256,
                         "manifest_version": manifest.version, "size": manifest.size,
                         "downloaded": not already, "serving": serve_it}))  # fmt: skip
        return
    click.echo(f"ok: {name}@{version} (v{manifest.version}) is in the store"
               + (" and serving" if serve_it else f"; `sidecar swap {name}@{version}` serves it"))  # fmt: skip


def _swap_step(step: Any) -> None:
    if not step.finished:
        click.echo(f"[{step.elapsed_ms / 1000:6.1f}s] {step.stage}: {step.detail}", err=True)


def _cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("sidecar")) / "pull"


# ---------------------------------------------------------------- show


def describe(
    path: Path, sha256: str = "", inspect: Callable[[Path], GGUFInfo] | None = None
) -> dict[str, Any]:
    """What the GGUF at `path` says about itself (header only; hashed unless `sha256`).
    `inspect` reads the header (through decryption for a sealed blob)."""
    from gguf.constants import GGMLQuantizationType, LlamaFileType

    from sidecar.fileio import sha256_file
    from sidecar.gguf_check import Array, check

    info = (inspect or check)(path)
    md = info.metadata
    arch = info.architecture

    def meta(key: str) -> Any:
        value = md.get(key)
        return None if isinstance(value, Array) else value

    params = 0
    by_type: Counter[str] = Counter()
    for t in info.tensors:
        n = 1
        for d in t.shape:
            n *= d
        params += n
        by_type[GGMLQuantizationType(t.type).name] += t.nbytes
    file_type = meta("general.file_type")
    try:
        quant = (
            LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
            if file_type is not None
            else ""
        )
    except ValueError:
        quant = f"file type {file_type}"
    tokens = md.get("tokenizer.ggml.tokens")
    return {
        "path": str(path),
        "size": info.file_size,
        "sha256": sha256 or sha256_file(path),
        "name": meta("general.name") or "",
        "architecture": arch,
        "parameters": params,
        "quantization": quant or (by_type.most_common(1)[0][0] if by_type else ""),
        "tensor_types": dict(by_type.most_common()),
        "context_length": meta(f"{arch}.context_length") or 0,
        "embedding_length": meta(f"{arch}.embedding_length") or 0,
        "layers": meta(f"{arch}.block_count") or 0,
        "vocabulary": tokens.count if isinstance(tokens, Array) else 0,
        "license": meta("general.license") or "",
        "chat_template": meta("tokenizer.chat_template") or "",
        "gguf_version": info.version,
    }


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _sealed_readers(
    ctx: click.Context,
) -> tuple[Callable[[Path], GGUFInfo], Callable[[Path], str]]:
    """How `show` reads a blob of an encrypted store (its header, its plaintext's sha256):
    with the keys this user's config names (the daemon never hands a key out)."""
    from sidecar.fileio import sha256_stream
    from sidecar.gguf_check import check_stream
    from sidecar.store.keys import load_keyring
    from sidecar.store.sealed import open_sealed

    cfg = config_from(ctx).store
    keys = load_keyring(False, cfg.key_file, cfg.previous_key_file, cfg.key, os.environ)
    by_id = keys.by_id if keys else {}

    def inspect(path: Path) -> GGUFInfo:
        with open_sealed(path, by_id) as r:
            return check_stream(r, r.size)  # type: ignore[arg-type]

    def plain_sha(path: Path) -> str:
        with open_sealed(path, by_id) as r:
            return sha256_stream(r)  # type: ignore[arg-type]

    return inspect, plain_sha


def _stored_file(ctx: click.Context, target: str, opts: dict[str, Any]) -> tuple[Path, str, str]:
    """NAME[@VERSION] -> (its file in the store, its sha256, NAME@VERSION)."""
    name, _, version = target.partition("@")
    _check_name(name)
    with connect(ctx, opts["socket"], opts["tcp"], opts["token"], opts["timeout"]) as c:
        try:
            listing = c.list_versions()
        except grpc.RpcError as e:
            _fail(f"{e.code().name}: {e.details()}")
    mine = [v for v in listing.versions if v.model == name]
    if version:
        mine = [v for v in mine if v.sha256.startswith(version)]
    else:  # what serves, else what is active, else the only one
        mine = [v for v in mine if v.serving] or [v for v in mine if v.active] or mine
    if len(mine) != 1:
        stored = ", ".join(f"{v.model}@{v.sha256[:12]}" for v in listing.versions) or "nothing"
        what = "no" if not mine else "more than one"
        _fail(f"{what} stored version matches {target!r} (the store holds: {stored})")
    v = mine[0]
    # The store's layout (sidecar.store.ModelStore.blob): blobs/<sha256>.gguf.
    return Path(listing.store) / "blobs" / f"{v.sha256}.gguf", v.sha256, f"{name}@{v.sha256[:12]}"


@click.command()
@click.argument("target")
@client_options
@click.pass_context
def show(ctx: click.Context, /, target: str, **opts: Any) -> None:
    """What a model's GGUF says: architecture, parameters, quantisation, context length,
    chat template, licence, size, sha256.

    TARGET is a stored version, NAME or NAME@VERSION (NAME alone: the version serving), read
    from the store the daemon reports, or the path of a GGUF file (no daemon needed).
    """
    from sidecar.domain.errors import SidecarError
    from sidecar.store.sealed import is_sealed

    if "/" in target or target.endswith(".gguf") or Path(target).is_file():
        path, sha, label = Path(target), "", target
    else:
        path, sha, label = _stored_file(ctx, target, opts)
    try:
        if is_sealed(path):
            inspect, plain_sha = _sealed_readers(ctx)
            d = describe(path, sha or plain_sha(path), inspect)
        else:
            d = describe(path, sha)
    except SidecarError as e:
        _fail(f"{path}: {e.message}")
    except OSError as e:
        _fail(f"cannot read {path}: {e.strerror or e}")
    if opts["as_json"]:
        click.echo(dump(d))
        return
    types = ", ".join(f"{k} {mb(v)}" for k, v in d["tensor_types"].items())
    rows = [
        ("model", label),
        ("name", d["name"]),
        ("architecture", d["architecture"]),
        ("parameters", f"{_count(d['parameters'])} ({d['parameters']})"),
        ("quantization", f"{d['quantization']} ({types})"),
        ("context length", d["context_length"]),
        ("embedding length", d["embedding_length"]),
        ("layers", d["layers"]),
        ("vocabulary", d["vocabulary"]),
        ("license", d["license"] or "(not stated)"),
        ("size", f"{mb(d['size'])} ({d['size']} bytes)"),
        ("sha256", d["sha256"]),
        ("file", d["path"]),
    ]
    for key, value in rows:
        click.echo(f"{key:<17} {value}")
    template = d["chat_template"]
    click.echo("chat template" + (":" if template else "     (none)"))
    for line in template.splitlines():
        click.echo(f"    {line}")
