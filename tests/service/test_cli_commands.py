"""The commands users of Ollama and LM Studio reach for (`pull`, `show`, `run`, `ps`, `logs`,
shell completion, `--version`), against a real daemon in this loop and the real CLI
(CliRunner in a thread so the daemon's loop keeps serving, or `.venv/bin/sidecar` as a
subprocess where a terminal, a signal or a follower is the point). Origins are folders and
a loopback HTTP server written by the real publisher code."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from gguf import GGUFReader
from tiny_gguf import write_tiny_llama
from trickle import TrickleOrigin
from update_origin import Origin, make_origin

import sidecar.engine.fake
from sidecar import __version__, logs
from sidecar.cli.commands import main
from sidecar.cli.support import EXIT_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED
from sidecar.fileio import sha256_file
from sidecar.logs import Recent, TextFormatter
from sidecar.update.manifest import generate_keypair

pytestmark = pytest.mark.asyncio

SIDECAR = str(Path(sys.executable).with_name("sidecar"))
TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %} pulled"


async def cli(*args: str, input: str | None = None) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, main, list(args), input)


def env_for(tmp: Path) -> dict[str, str]:
    """A subprocess environment with no user config and no SIDECAR_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env.update(XDG_CONFIG_HOME=str(tmp / "xdg-config"), XDG_CACHE_HOME=str(tmp / "xdg-cache"))
    return env


@pytest.fixture
def origin(tmp_path: Path, tiny_model: Path) -> Origin:
    return make_origin(tmp_path, tiny_model)


@pytest.fixture
def pulled(tmp_path: Path) -> Path:
    """The file the catalog offers as `tinyx`: another chat template, 8k context."""
    return write_tiny_llama(tmp_path / "tinyx.gguf", seed=3, n_ctx=8192, chat_template=TEMPLATE)


def catalog_config(tmp: Path, socket: Path, origin: str, key: str, extra: str = "") -> Path:
    cfg = tmp / "client.toml"
    cfg.write_text(
        f'[server]\nsocket = "{socket}"\n\n[update]\ncatalog_origin = "{origin}"\n'
        f'catalog_key = "{key}"\n{extra}'
    )
    return cfg


def stored(served: Any) -> set[tuple[str, str]]:
    return {(v.name, v.sha256) for v in served.running.local.store.all_versions()}


# ---------------------------------------------------------------- pull


async def test_pull_verifies_the_catalog_manifest_downloads_and_adds_to_the_store(
    serve, origin: Origin, pulled: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(origin.v1)
    origin.publish(1, pulled, name="tinyx")
    cfg = catalog_config(tmp_path, s.socket, str(origin.root), origin.public)
    sha = sha256_file(pulled)
    r = await cli("pull", "tinyx", "--config", str(cfg), "--dir", str(tmp_path / "dl"))
    assert r.exit_code == 0, r.output
    assert f"ok: tinyx@{sha[:12]} (v1) is in the store" in r.output
    assert ("tinyx", sha) in stored(s)
    assert list((tmp_path / "dl").iterdir()) == []  # the store keeps its own copy
    # Pulling again finds it there and downloads nothing.
    again = await cli("pull", "tinyx", "--config", str(cfg), "--dir", str(tmp_path / "dl"),
                      "--json")  # fmt: skip
    assert again.exit_code == 0, again.output
    got = json.loads(again.stdout)
    assert (
        got["downloaded"] is False and got["sha256"] == sha and got["size"] == pulled.stat().st_size
    )
    # --serve of a name the daemon does not serve: stored, and said so.
    unserved = await cli("pull", "tinyx", "--serve", "--config", str(cfg))
    assert unserved.exit_code == EXIT_FAILED
    assert f"tinyx@{sha[:12]} is in the store, but it does not serve: NOT_FOUND" in unserved.output


async def test_a_pull_whose_add_fails_keeps_the_verified_download_for_the_next(
    serve, origin: Origin, pulled: Path, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    import sidecar.client.sync as sync

    s = await serve(origin.v1)
    origin.publish(1, pulled, name="tinyx")
    cfg = catalog_config(tmp_path, s.socket, str(origin.root), origin.public)
    sha = sha256_file(pulled)
    dl = tmp_path / "dl"
    real = sync.Client.add_model

    def refused(self, *a, **k):  # type: ignore[no-untyped-def]
        # What the system service says when it cannot read the download folder.
        return real(self, tmp_path / "nowhere" / "x.gguf", name="tinyx")

    monkeypatch.setattr(sync.Client, "add_model", refused)
    r = await cli("pull", "tinyx", "--config", str(cfg), "--dir", str(dl))
    assert r.exit_code == EXIT_FAILED, r.output
    kept = dl / f"tinyx-{sha[:16]}.gguf"
    assert f"the download stays in {kept}" in r.output and sha256_file(kept) == sha
    monkeypatch.setattr(sync.Client, "add_model", real)
    for f in origin.root.rglob("*"):  # only the manifests stay: nothing could be downloaded
        if f.is_file() and not f.name.endswith(".manifest.json"):
            f.unlink()
    again = await cli("pull", "tinyx", "--config", str(cfg), "--dir", str(dl))
    assert again.exit_code == 0, again.output
    assert "using the download already" in again.output
    assert ("tinyx", sha) in stored(s) and not kept.exists()


async def test_pull_resumes_a_partial_download_over_http(
    serve, origin: Origin, pulled: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(origin.v1)
    origin.publish(1, pulled, name="tinyx")
    sha = sha256_file(pulled)
    dl = tmp_path / "dl"
    dl.mkdir()
    half = pulled.stat().st_size // 2
    (dl / f"tinyx-{sha[:16]}.gguf.partial").write_bytes(pulled.read_bytes()[:half])
    with TrickleOrigin(origin.root) as http:
        cfg = catalog_config(tmp_path, s.socket, http.url, origin.public)
        r = await cli("pull", "tinyx", "--config", str(cfg), "--dir", str(dl))
        requests = list(http.requests)
    assert r.exit_code == 0, r.output
    assert ("tinyx", sha) in stored(s)
    assert (f"files/{sha}.gguf", f"bytes={half}-") in requests, requests


async def test_pull_refuses_a_manifest_the_configured_key_did_not_sign(
    serve, origin: Origin, pulled: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(origin.v1)
    origin.publish(1, pulled, name="tinyx")
    _, other = generate_keypair()
    cfg = catalog_config(tmp_path, s.socket, str(origin.root), other)
    r = await cli("pull", "tinyx", "--config", str(cfg), "--dir", str(tmp_path / "dl"))
    assert r.exit_code == EXIT_FAILED, r.output
    assert "signature does not verify" in r.output
    assert not (tmp_path / "dl").exists()  # nothing was downloaded
    assert all(name != "tinyx" for name, _ in stored(s))


async def test_pull_of_a_name_the_catalog_lacks_or_without_a_catalog_says_so(
    serve, origin: Origin, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(origin.v1)
    cfg = catalog_config(tmp_path, s.socket, str(origin.root), origin.public)
    r = await cli("pull", "nosuch", "--config", str(cfg))
    assert r.exit_code == EXIT_FAILED and "'nosuch' is not in the catalog" in r.output
    bare = tmp_path / "bare.toml"
    bare.write_text(f'[server]\nsocket = "{s.socket}"\n')
    r = await cli("pull", "tinyx", "--config", str(bare))
    assert r.exit_code == EXIT_CONFIG and "set update.catalog_origin" in r.output
    r = await cli("pull", "../x", "--config", str(bare))
    assert r.exit_code == 2 and "NAME" in r.output


async def test_pull_serve_takes_a_models_own_origin_and_swaps_it_in(
    serve, origin: Origin, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(origin.v1)
    cfg = tmp_path / "client.toml"
    cfg.write_text(
        f'[server]\nsocket = "{s.socket}"\n\n[models.default]\npath = "{origin.v1}"\n'
        f'update_origin = "{origin.root}"\nupdate_key = "{origin.public}"\n'
    )
    r = await cli("pull", "default", "--serve", "--config", str(cfg),
                  "--dir", str(tmp_path / "dl"))  # fmt: skip
    assert r.exit_code == 0, r.output
    v2 = sha256_file(origin.v2)[:12]
    assert f"ok: default@{v2} (v2) is in the store and serving" in r.output
    assert (await s.client.status()).models[0].model.version == v2


# ---------------------------------------------------------------- show


def _params(path: Path) -> int:
    return sum(int(t.n_elements) for t in GGUFReader(path).tensors)


async def test_show_prints_what_the_gguf_says_for_a_path(pulled: Path) -> None:
    r = await cli("show", str(pulled), "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["architecture"] == "llama" and d["context_length"] == 8192
    assert d["parameters"] == _params(pulled) > 0
    assert d["quantization"] == "F32" and d["tensor_types"] == {
        "F32": sum(int(t.n_bytes) for t in GGUFReader(pulled).tensors)
    }
    assert d["chat_template"] == TEMPLATE
    assert d["sha256"] == sha256_file(pulled) and d["size"] == pulled.stat().st_size
    text = await cli("show", str(pulled))
    assert "architecture      llama" in text.output and "context length    8192" in text.output
    assert f"sha256            {sha256_file(pulled)}" in text.output
    assert "    {% for m in messages %}" in text.output  # the template, indented


async def test_show_reads_a_stored_version_by_name_and_version(
    serve, tiny_model: Path, pulled: Path
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model)
    await s.client.add_model(pulled, name="tinyx")
    sock = str(s.socket)
    serving = await cli("show", "default", "--socket", sock, "--json")
    assert serving.exit_code == 0, serving.output
    assert json.loads(serving.stdout)["sha256"] == sha256_file(tiny_model)
    sha = sha256_file(pulled)
    by_version = await cli("show", f"tinyx@{sha[:8]}", "--socket", sock, "--json")
    assert by_version.exit_code == 0, by_version.output
    d = json.loads(by_version.stdout)
    assert d["sha256"] == sha and d["context_length"] == 8192 and d["chat_template"] == TEMPLATE
    missing = await cli("show", "tinyx@ffff", "--socket", sock)
    assert missing.exit_code == EXIT_FAILED and "no stored version matches" in missing.output


async def test_show_says_what_is_wrong_with_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all, just some bytes")
    r = await cli("show", str(bad))
    assert r.exit_code == EXIT_FAILED and "wrong magic bytes" in r.output


# ---------------------------------------------------------------- ps


async def test_ps_shows_each_model_with_its_version_workers_rss_and_queue(
    serve, tiny_model: Path
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model, slot_kind="process", workers=2)
    version = (await s.client.status()).models[0].model.version
    r = await cli("ps", "--socket", str(s.socket), "--workers")
    assert r.exit_code == 0, r.output
    header, row, *workers = r.output.splitlines()
    assert header.split()[:3] == ["NAME", "VERSION", "STATE"]
    cells = row.split()
    assert cells[:2] == ["default*", version] and cells[2] in ("ready", "loaded"), row
    assert cells[3] == "2", row
    assert float(cells[4]) > 1 and cells[5] == "MiB"  # real worker processes have an RSS
    assert len(workers) == 2 and all(" pid " in w for w in workers)
    j = await cli("ps", "--socket", str(s.socket), "--json")
    model = json.loads(j.stdout)["models"][0]
    assert model["version"] == version and model["in_flight"] == 0
    assert len(model["workers"]) == 2 and model["rss_bytes"] > 2**20
    assert model["queue_limit"] > 0 and isinstance(model["queue_depth"], int)


# ---------------------------------------------------------------- logs


@pytest.fixture
def recent() -> Iterator[Recent]:
    """The daemon's recent-lines buffer, as `sidecar serve` sets it up (logs.configure)."""
    handler = Recent(size=50)
    handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)


async def test_logs_prints_the_daemons_recent_lines_as_it_formats_them(
    serve, tiny_model: Path, recent: Recent
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model)
    log = logging.getLogger("sidecar.test")
    for i in range(3):
        log.warning("marker %d\nforged line", i)
    r = await cli("logs", "-n", "2", "--socket", str(s.socket))
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("WARNING sidecar.test: marker 1\\nforged line")  # one record, one line
    assert lines[1].endswith("marker 2\\nforged line")
    # The first call's own request line may follow (at log level info): look among three.
    j = await cli("logs", "-n", "3", "--json", "--socket", str(s.socket))
    assert {"text": lines[1], "dropped": 0} in [json.loads(x) for x in j.stdout.splitlines()]


async def test_logs_follow_prints_new_lines_until_ctrl_c(
    serve, tiny_model: Path, recent: Recent, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model)
    logging.getLogger("sidecar.test").warning("before following")
    follow = [SIDECAR, "logs", "-f", "-n", "1", "--socket", str(s.socket)]
    proc = await asyncio.to_thread(subprocess.Popen, follow, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, env=env_for(tmp_path))  # fmt: skip
    assert proc.stdout is not None
    try:
        first = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert b"before following" in first
        logging.getLogger("sidecar.test").warning("while following")
        second = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 10)
        assert b"while following" in second
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        code = await asyncio.to_thread(proc.wait, 10)
        proc.stdout.close()
    assert code == EXIT_INTERRUPTED


async def test_the_daemons_log_set_up_keeps_recent_lines_in_its_own_format() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("info", "json", io.StringIO())
        first = logs.recent()
        assert first is not None
        logging.getLogger("sidecar.test").info("kept")
        assert json.loads(first.tail(1)[0][0])["msg"] == "kept"
        logs.configure("info", "text", io.StringIO())  # a reload: the same lines, the new format
        assert logs.recent() is first
        logging.getLogger("sidecar.test").info("again")
        kept, _ = first.tail(0)
        assert kept[-1].endswith("INFO sidecar.test: again") and '"kept"' in kept[-2]
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


async def test_a_follower_that_falls_behind_is_told_how_many_lines_it_missed() -> None:
    buffer = Recent(size=5)
    buffer.setFormatter(logging.Formatter("%(message)s"))

    def log(msg: str) -> None:
        buffer.handle(logging.LogRecord("t", logging.INFO, "", 0, msg, (), None))

    log("old")
    follower = buffer.follow(0)
    assert await anext(follower) == ("old", 0)
    reading = asyncio.ensure_future(anext(follower))
    await asyncio.sleep(0)  # the follower waits for a new line
    for i in range(12):  # more than the buffer holds, before the follower runs again
        log(f"new {i}")
    assert await reading == ("new 7", 7)  # new 0..6 fell out of the 5-line buffer
    assert [await anext(follower) for _ in range(4)] == [(f"new {i}", 0) for i in range(8, 12)]
    await follower.aclose()
    assert not buffer._waiters  # a follower that leaves is forgotten


# ---------------------------------------------------------------- run


async def test_run_sends_stdin_as_one_prompt_when_not_a_terminal(serve, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model)
    r = await cli("run", "--socket", str(s.socket), "--max-tokens", "4", input="hello there\n")
    assert r.exit_code == 0, r.output
    assert r.output == "hello there hello there \n"  # FakeSlot echoes the last message's words
    empty = await cli("run", "--socket", str(s.socket), input="")
    assert empty.exit_code == EXIT_CONFIG and "stdin is empty" in empty.output
    unknown = await cli("run", "nosuch", "--socket", str(s.socket), input="hi")
    assert unknown.exit_code == EXIT_FAILED and "NOT_FOUND" in unknown.output


class Terminal:
    """`sidecar run` on a pseudo-terminal: what a person typing sees and does."""

    def __init__(self, socket: Path, tmp: Path, *args: str) -> None:
        import pty

        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [SIDECAR, "run", "--socket", str(socket), "--max-tokens", "3", *args],
            stdin=slave, stdout=slave, stderr=slave, env=env_for(tmp), close_fds=True,
        )  # fmt: skip
        os.close(slave)
        self.seen = b""

    def expect(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} not seen in {self.seen!r}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    self.seen += os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    assert text.encode() in self.seen, f"{text!r} not seen in {self.seen!r}"
        out, _, self.seen = self.seen.partition(text.encode())
        return out.decode(errors="replace")

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> int:
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            os.close(self.master)


@pytest.fixture
def turns(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The messages of every chat turn the daemon's (fake) workers answer."""
    seen: list[list[str]] = []
    real = sidecar.engine.fake.FakeSlot._answer

    async def answer(self: Any, job_id: int, task: Any, stream: bool) -> Any:
        if hasattr(task, "messages"):
            seen.append([f"{m.role}:{m.content}" for m in task.messages])
        return await real(self, job_id, task, stream)

    monkeypatch.setattr(sidecar.engine.fake.FakeSlot, "_answer", answer)
    return seen


async def test_run_on_a_terminal_chats_with_history_and_ends_on_ctrl_d(
    serve, tiny_model: Path, tmp_path: Path, turns: list[list[str]]
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model)
    t = Terminal(s.socket, tmp_path, "--system", "be brief")

    def talk() -> int:
        t.expect(">>> ")
        t.type("hello there\n")
        assert "hello there hello" in t.expect(">>> ")  # the reply, streamed
        t.type("again\n")
        t.expect(">>> ")
        t.type("/clear\n")
        t.expect(">>> ")
        t.type("fresh\n")
        t.expect(">>> ")
        t.type("\x04")  # Ctrl-D
        return t.close()

    assert await asyncio.to_thread(talk) == 0
    assert turns == [
        ["system:be brief", "user:hello there"],
        ["system:be brief", "user:hello there", "assistant:hello there hello ", "user:again"],
        ["system:be brief", "user:fresh"],  # /clear keeps the system prompt only
    ]


async def test_run_on_a_terminal_exits_130_on_ctrl_c(
    serve, tiny_model: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model)
    t = Terminal(s.socket, tmp_path)

    def interrupt() -> int:
        t.expect(">>> ")
        # readline prints the prompt just before it waits for a key; a signal in between is
        # seen at the next key (CPython's readline), a window no person hits: wait it out.
        time.sleep(0.3)
        t.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        return t.close()

    assert await asyncio.to_thread(interrupt) == EXIT_INTERRUPTED


# ---------------------------------------------------------------- completion, --version


def _completion(tmp_path: Path) -> None:
    env = {**env_for(tmp_path), "_SIDECAR_COMPLETE": "bash_source"}
    script = subprocess.run([SIDECAR], env=env, capture_output=True, text=True, check=True).stdout
    assert "complete -o nosort -F _sidecar_completion sidecar" in script
    registered = subprocess.run(["bash", "-c", f'{script}\ncomplete -p sidecar'],
                                capture_output=True, text=True, check=True)  # fmt: skip
    assert "_sidecar_completion" in registered.stdout
    # What the script asks the CLI for when the user presses Tab after `sidecar pu`.
    words = {**env_for(tmp_path), "_SIDECAR_COMPLETE": "bash_complete",
             "COMP_WORDS": "sidecar pu", "COMP_CWORD": "1"}  # fmt: skip
    out = subprocess.run([SIDECAR], env=words, capture_output=True, text=True, check=True).stdout
    assert "plain,pull" in out.splitlines()
    for shell in ("zsh", "fish"):
        env = {**env_for(tmp_path), "_SIDECAR_COMPLETE": f"{shell}_source"}
        out = subprocess.run([SIDECAR], env=env, capture_output=True, text=True, check=True).stdout
        assert "_SIDECAR_COMPLETE" in out


async def test_bash_completion_script_registers_sidecar_and_completes_commands(
    tmp_path: Path,
) -> None:
    await asyncio.to_thread(_completion, tmp_path)


async def test_version_prints_the_package_version() -> None:
    r = await cli("--version")
    assert r.exit_code == 0 and r.output == f"sidecar, version {__version__}\n"
