"""`sidecar eval`: a labelled set through the running daemon, scored (sidecar.evaluation)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sidecar.cli.support import EXIT_CONFIG, EXIT_FAILED, client_options, config_from, connect, dump

if TYPE_CHECKING:
    from sidecar.config import Config
    from sidecar.evaluation.dataset import EvalSet
    from sidecar.evaluation.summary import Settings

ROUTINGS = ("LOCAL_ONLY", "AUTO", "CLOUD_ONLY")


def _fail(message: str, code: int = EXIT_CONFIG) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.command("eval")
@click.argument("target")
@click.option("--kind", type=click.Choice(["classify", "extract"]), default=None,
              help="Default: classify if the label column is there, else extract.")  # fmt: skip
@click.option("--task", default="", help="Classify the CSV's rows by this config task's examples.")
@click.option("--text-column", default=None, help="Default: text (a task's: its own).")
@click.option("--label-column", default=None, help="Classify: the right label (default: label).")
@click.option("--expected-column", default="expected", show_default=True,
              help="Extract: the JSON object the text should give.")  # fmt: skip
@click.option("--schema", default=None,
              help="Extract: JSON Schema (JSON or @FILE); default: made from the expected JSON.")  # fmt: skip
@click.option(
    "--model", "model_ref", default="", help="NAME or NAME@VERSION (refused if not served)."
)
@click.option("--routing", type=click.Choice(ROUTINGS), default="LOCAL_ONLY", show_default=True)
@click.option("--concurrency", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Requests at once.")  # fmt: skip
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N rows.")
@click.option("--html", "html_path", type=click.Path(path_type=Path), default=None,
              help="Also write the report as a self-contained HTML page with its plots.")  # fmt: skip
@client_options
@click.pass_context
def evaluate(ctx: click.Context, target: str, kind: str | None, task: str, text_column: str | None,
             label_column: str | None, expected_column: str, schema: str | None, model_ref: str,
             routing: str, concurrency: int, limit: int | None, html_path: Path | None,
             socket: Path | None,
             tcp: str | None, token: str | None, timeout: float, as_json: bool) -> None:  # fmt: skip
    """Run a labelled set through the daemon and report how good the answers and their
    confidence are. TARGET: a CSV file (Classify: text and label columns; Extract: text and
    the expected JSON object), or the name of a config task (its eval_file). The requests
    run at low priority, so callers of the daemon are served first."""
    from sidecar.evaluation import runner
    from sidecar.evaluation.dataset import EvalInputError, parse_schema
    from sidecar.evaluation.summary import summarise, table

    config = config_from(ctx)
    try:
        s = _resolve(config, target, kind, task, text_column, label_column, expected_column,
                     parse_schema(schema) if schema is not None else None)  # fmt: skip
    except EvalInputError as e:
        _fail(str(e))
    if limit is not None:
        s = _first(s, limit)
    name, _, version = model_ref.partition("@")
    with connect(ctx, socket, tcp, token, timeout) as c:
        if version:
            _check_version(c, name, version)
        with click.progressbar(length=len(s.rows), label=f"eval {len(s.rows)} rows",
                               file=sys.stderr) as bar:  # fmt: skip
            replies, wall = runner.run(c, s, model=name, routing=routing, concurrency=concurrency,
                                       on_row=lambda _i, _r: bar.update(1))  # fmt: skip
    report = summarise(s, replies, wall, _settings(config, s), routing)
    click.echo(dump(report) if as_json else table(report))
    if html_path is not None:
        from sidecar.evaluation.html import render
        from sidecar.fileio import write_atomic

        try:
            write_atomic(html_path, render(report).encode())
        except OSError as e:
            _fail(f"cannot write {html_path}: {e.strerror or e}", EXIT_FAILED)
        click.echo(f"report: {html_path}", err=True)
    if report["failed"] == report["rows"]:
        _fail(f"every request failed: {report['first_error']}", EXIT_FAILED)


def _resolve(config: Config, target: str, kind: str | None, task: str, text: str | None,
             label: str | None, expected: str, schema: dict[str, Any] | None) -> EvalSet:  # fmt: skip
    """The set TARGET names: a config task's eval_file, or a CSV file."""
    from sidecar.evaluation.dataset import Columns, EvalInputError, load

    tasks = {t.name: t for t in config.tasks}
    known = ", ".join(sorted(tasks)) or "none configured"
    spec = tasks.get(target)
    if spec is not None:
        if not spec.eval_file:
            raise EvalInputError(
                f"task {target!r} has no held-out file: set tasks.{target}.eval_file in the "
                "config, or pass a CSV with --task"
            )
        if kind == "extract" or task:
            raise EvalInputError(
                f"{target!r} is a Classify task: --kind extract and --task do not apply"
            )
        columns = Columns(text or spec.text_column, label or spec.label_column, expected)
        return load(Path(spec.eval_file), columns, kind="classify", task=target)
    # Naming a label column (or a task) says Classify; a schema says Extract.
    if kind is None and (label or task):
        kind = "classify"
    elif kind is None and schema is not None:
        kind = "extract"
    if task:
        spec = tasks.get(task)
        if spec is None:
            raise EvalInputError(f"no task named {task!r} in the config (known: {known})")
        text, label = text or spec.text_column, label or spec.label_column
    path = Path(target)
    if not path.exists():
        raise EvalInputError(f"{target!r} is neither a CSV file nor a config task (tasks: {known})")
    columns = Columns(text or "text", label or "label", expected)
    return load(path, columns, kind=kind, task=task, schema=schema)  # type: ignore[arg-type]


def _first(s: EvalSet, n: int) -> EvalSet:
    from dataclasses import replace

    return replace(s, rows=s.rows[:n])


def _check_version(c: Any, name: str, version: str) -> None:
    from sidecar.cli.support import call

    models = {m.model.name: m.model.version for m in call(c.status).models}
    serving = models.get(name)
    if serving is None:
        _fail(f"the daemon serves no model {name!r} (it serves: {', '.join(models)})", EXIT_FAILED)
    elif not serving.startswith(version) and not version.startswith(serving):
        _fail(f"{name} is serving version {serving}, not {version}: swap to it first "
              f"(sidecar swap {name}@{version})", EXIT_FAILED)  # fmt: skip


def _settings(config: Config, s: EvalSet) -> Settings:
    from sidecar.evaluation.summary import Settings

    cloud = config.cloud
    threshold = cloud.extract_mean_logprob if s.kind == "extract" else cloud.classify_threshold
    spec = next((t for t in config.tasks if t.name == s.task), None)
    if spec is not None and spec.threshold >= 0:
        threshold = spec.threshold
    return Settings(threshold, cloud.enabled, cloud.prompt_price_per_mtok,
                    cloud.completion_price_per_mtok)  # fmt: skip
