"""The README and docs/ point at things that exist: files, anchors, `sidecar` commands, modules."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from sidecar.cli.commands import main

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def prose(page: Path) -> str:
    """The page without its fenced code blocks (a `[x](y)` in code is not a link)."""
    return FENCE.sub("", page.read_text())


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", prose(page), re.M):
        base, n = slug(heading), 0
        while (f"{base}-{n}" if n else base) in found:  # GitHub numbers repeated headings
            n += 1
        found.add(f"{base}-{n}" if n else base)
    return found


def relative_links() -> list[tuple[Path, str]]:
    return [
        (page, target)
        for page in PAGES
        for target in LINK.findall(prose(page))
        if not re.match(r"[a-z]+:", target)  # http:, https:, mailto: are not checked here
    ]


def test_the_docs_pages_exist_and_the_readme_links_each() -> None:
    linked = {
        (REPO / t.split("#")[0]).resolve() for p, t in relative_links() if p.name == "README.md"
    }
    for page in PAGES[1:]:
        assert page.resolve() in linked, f"README.md does not link {page.relative_to(REPO)}"
    assert len(PAGES) > 1


def test_slug_follows_github() -> None:
    assert (
        slug("Routing: local first, the cloud when it pays")
        == "routing-local-first-the-cloud-when-it-pays"
    )
    assert (
        slug("The API (`protos/sidecar/v1/inference.proto`)")
        == "the-api-protossidecarv1inferenceproto"
    )
    assert slug("Reload (SIGHUP)") == "reload-sighup"


@pytest.mark.parametrize(
    ("page", "target"),
    relative_links(),
    ids=[f"{p.name}->{t}" for p, t in relative_links()],
)
def test_relative_link_points_at_an_existing_file_and_anchor(page: Path, target: str) -> None:
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    assert dest.exists(), f"{page.relative_to(REPO)}: {target} points at a missing file"
    if anchor:
        assert dest.suffix == ".md", target
        assert anchor in anchors(dest), (
            f"{page.relative_to(REPO)}: no heading #{anchor} in {dest.name}"
        )


def sidecar_invocations() -> list[list[str]]:
    """Every `sidecar ...` the pages show, in code blocks and inline code, as argument lists."""
    found = []
    for page in PAGES:
        text = page.read_text()
        snippets = [b.replace("\\\n", " ") for b in re.findall(r"```sh\n(.*?)```", text, re.S)]
        lines = [ln for block in snippets for ln in block.splitlines()]
        lines += [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", FENCE.sub("", text))]
        for line in [ln for ln in lines if re.search(r"(^|[/ (])sidecar( |$)", ln)]:
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words):
                if word == "sidecar" or (
                    word.endswith("/sidecar") and word.startswith((".", "~", "$("))
                ):
                    args = []
                    for arg in words[i + 1 :]:
                        if arg in {"|", "&&", ";"} or arg.endswith(")"):
                            break
                        args.append(arg)
                    found.append(args)
    return found


def check_args(args: list[str]) -> None:
    """The words name real subcommands and options, as click would parse them."""
    command: click.Command = main
    rest = list(args)
    while rest:
        word = rest.pop(0)
        default = getattr(command, "default", None)
        if word.startswith("-") and default is not None:  # an option of `eval run`
            command = command.commands[default]  # type: ignore[attr-defined]
        if word.startswith("-"):
            name = word.split("=", 1)[0]
            options = {o: p for p in command.params for o in (*p.opts, *p.secondary_opts)}
            assert name in options or name == "--help", f"sidecar {' '.join(args)}: no {name}"
            param = options.get(name)
            if isinstance(param, click.Option) and not param.is_flag and "=" not in word:
                rest.pop(0)  # its value
        elif isinstance(command, click.Group):
            default = getattr(command, "default", None)  # `sidecar eval TARGET` = `eval run`
            if default is not None and word not in command.commands:
                command = command.commands[default]
                rest.insert(0, word)
                continue
            sub = command.commands.get(word)
            assert sub is not None, f"sidecar {' '.join(args)}: no command {word!r}"
            command = sub


def test_every_sidecar_command_in_the_docs_exists() -> None:
    invocations = sidecar_invocations()
    assert ["status", "--json"] in invocations  # the scan sees the quick start
    for args in invocations:
        check_args(args)


def test_a_misspelt_command_or_option_would_be_caught() -> None:
    with pytest.raises(AssertionError):
        check_args(["modles", "gc"])
    with pytest.raises(AssertionError):
        check_args(["swap", "x@1", "--stratgy", "replace"])
    check_args(["models", "gc", "--quarantine"])


def layout() -> dict[str, str]:
    """The Layout block of docs/development.md: path -> what it says about it."""
    text = (REPO / "docs" / "development.md").read_text()
    block = text[text.index("## Layout") :].split("```", 2)[1]
    entries: dict[str, str] = {}
    path = ""
    for line in block.splitlines()[1:]:
        if line.startswith(" "):
            entries[path] += " " + line.strip()
        elif line.strip():
            path, _, said = line.partition(" ")
            entries[path] = said.strip()
    return entries


def test_the_layout_names_only_paths_that_exist() -> None:
    for path in layout():
        assert (REPO / path).exists(), f"docs/development.md Layout: {path} does not exist"


def test_the_layout_names_every_module_and_package_of_sidecar() -> None:
    entries = layout()
    top = REPO / "sidecar"
    for item in sorted(top.iterdir()):
        if item.name.startswith(("_", ".")) or not (item.suffix == ".py" or item.is_dir()):
            continue
        name = f"sidecar/{item.name}/" if item.is_dir() else f"sidecar/{item.name}"
        assert name in entries, f"docs/development.md Layout does not list {name}"
        if item.is_dir() and item.name != "v1":
            for module in sorted(item.glob("*.py")):
                if module.stem in {"__init__", "__main__"}:
                    continue
                said = entries[name]
                assert re.search(rf"\b{module.stem}\b", said), (
                    f"Layout: {name} says nothing of {module.name}"
                )
    assert "benchmarks/" in entries and "docs/" in entries
