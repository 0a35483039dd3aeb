"""Runnable examples in the README and docs/ say what the code does (checked where it is cheap)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from types import SimpleNamespace

from click.testing import CliRunner

from sidecar.cli.commands import _banner, main
from sidecar.config import Overrides, load

REPO = Path(__file__).resolve().parents[2]
FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PAGES = {f.relative_to(REPO).as_posix(): f.read_text() for f in FILES}
TEXT = "\n".join(PAGES.values())


def page_with(marker: str) -> str:
    """The one page that holds `marker`: an example lives in one place."""
    (text,) = [text for text in PAGES.values() if marker in text]
    return text


def shell_lines() -> list[str]:
    """Every command in the ```sh blocks of the README and docs/, continuation lines joined."""
    blocks = re.findall(r"```sh\n(.*?)```", TEXT, re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def test_raw_generate_examples_bound_their_length() -> None:
    # Greedy raw continuation on the demo model repeats itself until max_tokens (256).
    generates = [ln for ln in shell_lines() if re.search(r"sidecar generate\b", ln)]
    assert generates
    for line in generates:
        assert "--max-tokens" in line, line
    config = load(Overrides(config=Path("/dev/null"), socket=Path("/s.sock")), env={})
    banner = _banner(config, SimpleNamespace(grpc=SimpleNamespace(tcp_port=None), http=None))  # type: ignore[arg-type]
    (line,) = [ln for ln in banner.splitlines() if "sidecar generate" in ln]
    assert "--max-tokens" in line


def test_socket_examples_work_without_xdg_runtime_dir(tmp_path: Path) -> None:
    # A service, a container or `su` has no XDG_RUNTIME_DIR; the examples must not rely on it.
    for line in shell_lines():
        if "grpcurl" in line or "client.js" in line:
            assert "XDG_RUNTIME_DIR" not in line, line
    # The form they use instead: the socket the CLI itself would dial.
    (sock,) = [ln for ln in shell_lines() if ln.startswith("SOCK=")]
    assert shlex.split(sock.split("$(", 1)[1].split("|")[0])[1:] == ["config"]
    # An empty config home: a developer's own config must not change the answer.
    env = {"SIDECAR_SERVER_SOCKET": "/x/y.sock", "XDG_RUNTIME_DIR": None,
           "XDG_CONFIG_HOME": str(tmp_path), "SIDECAR_CONFIG": None}  # fmt: skip
    out = CliRunner().invoke(main, ["config"], env=env)  # type: ignore[arg-type]
    assert out.exit_code == 0, out.output
    assert re.findall(r"^socket: (.*)$", out.output, re.M) == ["/x/y.sock"]


def test_openai_unix_socket_example_sends_the_token() -> None:
    # The HTTP API checks http.token on the Unix socket too: a placeholder key is a 401.
    page = page_with("# On the Unix socket instead")
    example = page[page.index("# On the Unix socket instead") :]
    example = example[: example.index("```")]
    assert 'api_key="-"' not in example
    assert 'api_key="change-me"' in example and "http.token" in example


def test_update_apply_example_is_what_apply_prints() -> None:
    from sidecar.cli.update import _summary
    from sidecar.v1 import inference_pb2 as pb

    plan = "delta v1 -> v2 (508 of 98362464 bytes)"
    outcome = pb.UpdateOutcome(
        model="classifier", installed=True, from_version=1, to_version=2,
        new_version="3cd5bbee9a2f", plan=plan, fetched_bytes=508, full_bytes=98362464,
    )  # fmt: skip
    page = page_with("sidecar update apply classifier")
    assert f"# {_summary(outcome)}\n" in page
    assert f"# classifier: v2 available (serving v1); would fetch {plan}\n" in page
