"""Every CLI command that takes `--json`, run for real (CliRunner, in a thread) against a real
daemon on a real socket: its output is strict JSON in the documented shape, every field of
the reply present (zero values too), 64-bit integers as numbers, enums as short names; a
progress stream is JSON Lines. docs/client.md's table names the same shape per command."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from update_origin import make_origin

from sidecar.cli.commands import main
from sidecar.logs import configure
from sidecar.v1 import inference_pb2 as pb

REPO = Path(__file__).resolve().parents[2]

INT64 = {"TYPE_INT64", "TYPE_UINT64", "TYPE_SINT64", "TYPE_FIXED64", "TYPE_SFIXED64"}
INTS = INT64 | {"TYPE_INT32", "TYPE_UINT32", "TYPE_SINT32", "TYPE_FIXED32", "TYPE_SFIXED32"}


def _type_name(f: Any) -> str:
    return next(n for n in dir(f) if n.startswith("TYPE_") and getattr(f, n) == f.type)


def check_shape(descriptor: Any, data: Any, where: str = "") -> int:
    """`data` is `descriptor`'s message in the documented JSON shape; returns how many
    64-bit integer values it checked."""
    assert isinstance(data, dict), f"{where}: {data!r} is not an object"
    names = {f.name for f in descriptor.fields}
    assert set(data) == names, f"{where}: keys {sorted(data)} != fields {sorted(names)}"
    checked = 0
    for f in descriptor.fields:
        value, at = data[f.name], f"{where}.{f.name}"
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            assert isinstance(value, dict), at
            vf = f.message_type.fields_by_name["value"]
            for k, v in value.items():
                checked += _check_value(vf, v, f"{at}[{k}]")
        elif f.is_repeated:
            assert isinstance(value, list), at
            for i, v in enumerate(value):
                checked += _check_value(f, v, f"{at}[{i}]")
        elif value is None:
            assert f.has_presence, f"{at}: null for a field that is always present"
        else:
            checked += _check_value(f, value, at)
    return checked


def _check_value(f: Any, value: Any, at: str) -> int:
    kind = _type_name(f)
    if f.message_type is not None:
        return check_shape(f.message_type, value, at)
    if kind in INTS:
        assert type(value) is int, f"{at}: {value!r} is not a JSON integer"
        return int(kind in INT64)
    if kind in ("TYPE_DOUBLE", "TYPE_FLOAT"):
        assert value is None or type(value) in (int, float), f"{at}: {value!r}"
    elif kind == "TYPE_BOOL":
        assert type(value) is bool, f"{at}: {value!r}"
    elif kind == "TYPE_STRING":
        assert type(value) is str, f"{at}: {value!r}"
    elif kind == "TYPE_ENUM":
        assert type(value) is str and re.fullmatch(r"[a-z0-9_]+", value), f"{at}: {value!r}"
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", f.enum_type.name).upper() + "_"
        assert prefix + value.upper() in f.enum_type.values_by_name, f"{at}: {value!r}"
    elif kind == "TYPE_BYTES":
        assert type(value) is list and all(type(b) is int and 0 <= b < 256 for b in value), at
    return 0


def strict(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def json_commands(group: click.Group = main, path: tuple[str, ...] = ()) -> set[str]:
    """Every command (a group too) that takes --json, as "models list"."""
    found = set()
    for name, cmd in group.commands.items():
        here = (*path, name)
        if any("--json" in p.opts for p in cmd.params):
            found.add(" ".join(here))
        if isinstance(cmd, click.Group):
            found |= json_commands(cmd, here)
    return found


def plain(doc: Any, where: str = "") -> int:
    """A reply the CLI builds itself (not a protobuf message): strict JSON whose counts are
    numbers, never numeric strings. Returns how many integers it saw."""
    if isinstance(doc, dict):
        return sum(plain(v, f"{where}.{k}") for k, v in doc.items() if k not in HEX)
    if isinstance(doc, list):
        return sum(plain(v, f"{where}[{i}]") for i, v in enumerate(doc))
    assert not (isinstance(doc, str) and re.fullmatch(r"-?\d+(\.\d+)?", doc)), f"{where}: {doc!r}"
    return int(type(doc) is int)


MINI_TEST = REPO / "tests" / "data" / "banking77-mini" / "test.csv"
HEX = {"version", "sha256", "text", "new_version"}  # strings that may happen to be all digits


# command -> (its arguments before --json/--socket, what it prints: a protobuf message or
# `plain` for a shape the CLI builds, JSON Lines or one object, stdin)
Args = Callable[[Any], list[str]]
SHAPES: dict[str, tuple[Args, Any, bool, str | None]] = {
    "status": (lambda d: [], pb.StatusReply, False, None),
    "generate": (lambda d: ["--max-tokens", "3", "one two"], pb.GenerateReply, False, None),
    "chat": (lambda d: ["--max-tokens", "2", "hi there"], pb.GenerateReply, False, None),
    "run": (lambda d: ["--max-tokens", "2"], pb.GenerateReply, False, "hello there"),
    "classify": (lambda d: ["my card", "-l", "card", "-l", "cash"], pb.ClassifyReply, False, None),
    "extract": (
        lambda d: [
            "Ann, 31",
            "--schema",
            '{"type":"object","properties":{"age":{"type":"integer"}}}',
        ],
        pb.ExtractReply,
        False,
        None,
    ),
    "embed": (lambda d: ["one", "two"], pb.EmbedReply, False, None),
    "eval run": (
        lambda d: [str(MINI_TEST), "--label-column", "category", "--limit", "5"],
        plain,
        False,
        None,
    ),
    "ps": (lambda d: [], plain, False, None),
    "logs": (lambda d: ["-n", "5"], plain, True, None),
    "unload": (lambda d: [], pb.ResidencyReply, False, None),
    "load": (lambda d: [], pb.ResidencyReply, False, None),
    "update check": (lambda d: [], pb.UpdateCheck, False, None),
    "update apply": (lambda d: [], pb.UpdateProgress, True, None),
    "swap": (lambda d: [str(d.origin.v1)], pb.SwapProgress, True, None),
    "show": (lambda d: ["default"], plain, False, None),
    "pull": (lambda d: ["default"], plain, False, None),
    "models": (lambda d: [], pb.ListVersionsReply, False, None),
    "models list": (lambda d: [], pb.ListVersionsReply, False, None),
    "models add": (lambda d: [str(d.origin.v2), "--name", "other"], pb.AddModelReply, False, None),
    "models remove": (lambda d: ["other@" + d.v2], None, False, None),
    "models activate": (lambda d: [f"default@{d.v2}"], pb.SwapProgress, True, None),
    "models gc": (lambda d: ["--quarantine"], pb.CollectGarbageReply, False, None),
}
STREAMED = {
    "generate --stream": ["generate", "--stream", "--max-tokens", "3", "a b"],
    "chat --stream": ["chat", "--stream", "--max-tokens", "2", "a b"],
}


@pytest.fixture
def daemon_logging() -> Iterator[None]:
    """The log set-up `sidecar serve` makes (it keeps the recent lines `sidecar logs`
    reads), undone afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    configure("info", "json", stream=io.StringIO())
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


class Daemon:
    def __init__(self, socket: Path, origin: Any, config: Path) -> None:
        self.socket, self.origin, self.config, self.v2 = socket, origin, config, ""


async def run(*args: str, stdin: str | None = None) -> str:
    out = await asyncio.to_thread(CliRunner().invoke, main, list(args), stdin)
    assert out.exit_code == 0, (args, out.output)
    return out.stdout


def test_the_table_covers_every_command_that_takes_json() -> None:
    missing = json_commands() - set(SHAPES)
    assert not missing, f"commands with --json that nothing checks (add them to SHAPES): {missing}"
    assert not set(SHAPES) - json_commands()


async def test_every_json_command_prints_its_reply_whole_with_numbers_as_numbers(
    serve, tiny_model: Path, tmp_path: Path, daemon_logging: None
) -> None:  # type: ignore[no-untyped-def]
    origin = make_origin(tmp_path, tiny_model)
    s = await serve(
        origin.v1, model_keys={"update_origin": str(origin.root), "update_key": origin.public}
    )
    # `pull` reads its catalog (the model's origin and key) from the config file.
    config = tmp_path / "client.toml"
    config.write_text(
        f'[server]\nsocket = "{s.socket}"\n[models.default]\npath = "{origin.v1}"\n'
        f'update_origin = "{origin.root}"\nupdate_key = "{origin.public}"\n'
    )
    d = Daemon(s.socket, origin, config)
    int64_values = 0
    # In this order: apply installs v2, swap goes back to v1, add and remove store v2 as
    # "other", activate serves v2 again.
    for command, (args, message, lines, stdin) in SHAPES.items():
        config = ["--config", str(d.config)] if command == "pull" else []
        text = await run(*command.split(), *args(d), "--json", "--socket", str(s.socket), *config,
                         stdin=stdin)  # fmt: skip
        docs = [strict(ln) for ln in text.splitlines()] if lines else [strict(text)]
        assert docs, command
        for doc in docs:
            if message is None:
                assert doc == {"model": "other", "version": d.v2}, command
            elif message is plain:
                plain(doc, command)
            else:
                int64_values += check_shape(message.DESCRIPTOR, doc, command)
        if command == "update apply":
            assert docs[-1]["outcome"]["installed"] is True and docs[-1]["stage"] == "done"
            d.v2 = docs[-1]["outcome"]["new_version"]
            assert type(docs[-1]["outcome"]["to_version"]) is int
        if command == "status":  # zero values are there, as numbers: nothing restarted yet
            m = docs[0]["models"][0]
            assert m["restarts"] == 0 and m["queue_depth"] == 0 and m["last_error"] == ""
            assert m["workers"][0]["rss_bytes"] == 0  # a fake worker: a uint64 zero, as 0
            assert type(docs[0]["memory_available_bytes"]) is int
            assert docs[0]["cloud"]["calls"] == 0 and docs[0]["cloud"]["configured"] is False
        if command == "generate":
            assert (
                docs[0]["finish_reason"] == "length" and docs[0]["usage"]["completion_tokens"] == 3
            )
        if lines:
            assert docs[-1].get("finished", True) and docs[-1].get("ok", True), command
    assert int64_values >= 10
    for name, argv in STREAMED.items():
        text = await run(*argv, "--json", "--socket", str(s.socket))
        check_shape(pb.GenerateReply.DESCRIPTOR, strict(text), name)  # the summary, whole


def documented_shapes() -> dict[str, str]:
    """docs/client.md's table: `sidecar COMMAND ...` -> the message its --json prints."""
    text = (REPO / "docs" / "client.md").read_text()
    rows = re.findall(
        r"^\| `sidecar ([a-z ]+?)(?: [A-Z\[].*?)?(?: --stream)?` \| (.+?) \|", text, re.M
    )
    return {cmd: shape for cmd, shape in rows}


def test_docs_name_the_shape_of_every_json_command() -> None:
    documented = documented_shapes()
    for command, (_, message, lines, _stdin) in SHAPES.items():
        assert command in documented, f"docs/client.md does not document `sidecar {command} --json`"
        shape = documented[command]
        if message not in (None, plain):
            assert f"`{message.DESCRIPTOR.name}`" in shape, (command, shape)
        assert ("one line per" in shape) is lines, (command, shape)
