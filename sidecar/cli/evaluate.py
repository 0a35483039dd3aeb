"""`sidecar eval`: a labelled set through the running daemon, scored (sidecar.evaluation);
`sidecar eval export-disagreements`: the shadow traffic's disagreements as a CSV."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sidecar.cli.support import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    client_options,
    config_from,
    connect,
    connection_options,
    dump,
)

if TYPE_CHECKING:
    from sidecar.config import Config
    from sidecar.evaluation.dataset import EvalSet
    from sidecar.evaluation.summary import Settings

ROUTINGS = ("LOCAL_ONLY", "AUTO", "CLOUD_ONLY", "compare")


def _fail(message: str, code: int = EXIT_CONFIG) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class _EvalGroup(click.Group):
    """`sidecar eval TARGET ...` runs a set (the `run` subcommand) unless the first word names
    another subcommand: the one-command form came first and stays as it was."""

    default = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or args[0] not in self.commands:
            args = [self.default, *args]
        return super().parse_args(ctx, args)


@click.group("eval", cls=_EvalGroup)
def eval_group() -> None:
    """Score a labelled set through the daemon (`sidecar eval TARGET`, the same as
    `sidecar eval run TARGET`), or export what shadow traffic found."""


@eval_group.command("run")
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
@click.option("--target-accuracy", type=float, default=None,
              help="Show the threshold that keeps the most local at this accuracy, in (0, 1].")  # fmt: skip
@click.option("--fit-threshold", is_flag=True,
              help="Save that threshold where the daemon reads it (needs --target-accuracy).")  # fmt: skip
@client_options
@click.pass_context
def evaluate(ctx: click.Context, target: str, kind: str | None, task: str, text_column: str | None,
             label_column: str | None, expected_column: str, schema: str | None, model_ref: str,
             routing: str, concurrency: int, limit: int | None, html_path: Path | None,
             target_accuracy: float | None, fit_threshold: bool, socket: Path | None,
             tcp: str | None, token: str | None, timeout: float, as_json: bool) -> None:  # fmt: skip
    """Run a labelled set through the daemon and report how good the answers and their
    confidence are. TARGET: a CSV file (Classify: text and label columns; Extract: text and
    the expected JSON object), or the name of a config task (its eval_file). The requests
    run at low priority, so callers of the daemon are served first."""
    from sidecar.evaluation import runner
    from sidecar.evaluation.dataset import EvalInputError, parse_schema
    from sidecar.evaluation.summary import compare, finite, summarise, table

    config = config_from(ctx)
    try:
        s = _resolve(config, target, kind, task, text_column, label_column, expected_column,
                     parse_schema(schema) if schema is not None else None)  # fmt: skip
    except EvalInputError as e:
        _fail(str(e))
    if limit is not None:
        s = _first(s, limit)
    _check_fit(target_accuracy, fit_threshold, routing, len(s.rows))
    name, _, version = model_ref.partition("@")
    with connect(ctx, socket, tcp, token, timeout) as c:
        if version:
            _check_version(c, name, version)
        both = routing == "compare"
        if both:
            _check_cloud(c)
        with click.progressbar(length=len(s.rows) * (1 + both), label=f"eval {len(s.rows)} rows",
                               file=sys.stderr) as bar:  # fmt: skip
            # compare: every row locally, then the same rows to the cloud (the daemon's
            # privacy gate refuses the rows it keeps local; nothing of them is sent)
            first = "LOCAL_ONLY" if both else routing
            done = [0]

            def row(_i: int, _r: object) -> None:
                done[0] += 1
                bar.update(1)

            try:
                replies, wall = runner.run(c, s, model=name, routing=first,
                                           concurrency=concurrency, on_row=row)  # fmt: skip
                if both:
                    cloud, _ = runner.run(c, s, model=name, routing="CLOUD_ONLY",
                                          concurrency=concurrency, on_row=row)  # fmt: skip
            except KeyboardInterrupt:
                click.echo(f"\ninterrupted after {done[0]} of {bar.length} requests: no report",
                           err=True)  # fmt: skip
                sys.exit(EXIT_INTERRUPTED)
        settings = _settings(config, s, target_accuracy)
        if both:  # the daemon has a cloud (checked), whatever this command's config says
            settings = replace(settings, cloud=True)
        report = summarise(s, replies, wall, settings, routing)
        if both:
            report["compare"] = finite(compare(s, replies, cloud, report))
        refused = _save_fit(c, s, report) if fit_threshold else ""
        live = _live_agreement(c, s, report)
        if live:
            report["live_agreement"] = live
    click.echo(dump(report) if as_json else table(report))
    if html_path is not None:
        from sidecar.evaluation.html import render
        from sidecar.fileio import write_atomic

        try:
            write_atomic(html_path, render(report).encode())
        except OSError as e:
            _fail(f"cannot write {html_path}: {e.strerror or e}", EXIT_FAILED)
        click.echo(f"report: {html_path}", err=True)
    if refused:
        _fail(refused, EXIT_FAILED)
    if report["failed"] + report["unanswered"] == report["rows"]:
        first = report["first_error"] or report["first_unanswered"]
        _fail(f"every request failed: {first}", EXIT_FAILED)


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


def _check_cloud(c: Any) -> None:
    from sidecar.cli.support import call

    if not call(c.status).cloud.configured:
        _fail("--routing compare needs a cloud: the daemon has no [cloud] section configured",
              EXIT_FAILED)  # fmt: skip


def _check_version(c: Any, name: str, version: str) -> None:
    from sidecar.cli.support import call

    models = {m.model.name: m.model.version for m in call(c.status).models}
    serving = models.get(name)
    if serving is None:
        _fail(f"the daemon serves no model {name!r} (it serves: {', '.join(models)})", EXIT_FAILED)
    elif not serving.startswith(version) and not version.startswith(serving):
        _fail(f"{name} is serving version {serving}, not {version}: swap to it first "
              f"(sidecar swap {name}@{version})", EXIT_FAILED)  # fmt: skip


def _check_fit(target: float | None, fit: bool, routing: str, rows: int) -> None:
    """Refuse a fit that cannot be right, before any request is sent (exit 2)."""
    from sidecar.evaluation.summary import MIN_FIT_ROWS

    if target is not None and not 0 < target <= 1:
        _fail(f"--target-accuracy must be in (0, 1] (a share of right answers), not {target:g}")
    if not fit:
        return
    if target is None:
        _fail("--fit-threshold needs --target-accuracy A: the accuracy the kept answers must have")
    if routing not in ("LOCAL_ONLY", "compare"):
        _fail(f"--fit-threshold needs --routing LOCAL_ONLY (the default): under {routing} an "
              "escalated row carries the cloud's answer, which says nothing of the local one")  # fmt: skip
    if rows < MIN_FIT_ROWS:
        _fail(f"--fit-threshold needs at least {MIN_FIT_ROWS} rows, this set has {rows}: "
              "a threshold fitted on fewer follows noise")  # fmt: skip


def _save_fit(c: Any, s: EvalSet, report: dict[str, Any]) -> str:
    """Write the fitted threshold where the daemon reads it (the path its status names);
    return why nothing was written, or "". The report says what was written, and where."""
    from sidecar.cli.support import call
    from sidecar.router import fitted

    fit = report["confidence"]["fitted"]
    if fit["rows"] < fit["min_rows"]:
        return (f"nothing written: {fit['rows']} rows were answered locally with a confidence, "
                f"a fit needs at least {fit['min_rows']}")  # fmt: skip
    if not fit["reached"]:
        best = fit["best_accuracy"]
        return (f"nothing written: no threshold reaches accuracy {fit['target']:g} on this set; "
                f"the best any threshold keeps is {best:.3f}" if best is not None else
                "nothing written: no threshold reaches the target")  # fmt: skip
    models = list(report["models"])
    if len(models) != 1:
        return (
            f"nothing written: the rows were answered by {len(models)} models ({', '.join(models)})"
        )
    path = call(c.status).cloud.thresholds_file
    if not path:
        return "nothing written: the daemon does not say where it reads fitted thresholds"
    name = fitted.key(s.kind, task=s.task, model=models[0].partition("@")[0])
    assert name is not None  # an eval set names labels or a task, never inline examples
    entry = fitted.Fitted(fit["threshold"], fit["target"], fit["accuracy"], fit["coverage"],
                          fit["rows"], models[0], str(s.source), fitted.now())  # fmt: skip
    try:
        fitted.save(Path(path), name, entry)
    except OSError as e:
        return (f"cannot write {path}: {e.strerror or e} (run this on the daemon's machine, as "
                "a user who may write its store)")  # fmt: skip
    except ValueError as e:
        return (
            f"nothing written: {e}; fix or remove the file first (its other entries would be lost)"
        )
    fit["key"], fit["written_to"] = name, path
    return ""


def _live_agreement(c: Any, s: EvalSet, report: dict[str, Any]) -> list[dict[str, Any]]:
    """What shadow traffic measured for this set's key (the fitted thresholds' key: the
    task, or the kind and model), every model version the daemon has counts for."""
    from sidecar.cli.support import call
    from sidecar.router import fitted

    cloud = call(c.status).cloud
    if not cloud.HasField("shadow"):
        return []
    names = {m.partition("@")[0] for m in report["models"]}
    keys = {fitted.key(s.kind, task=s.task, model=n) for n in names}
    return [
        {"key": a.key, "model": a.model, "agreed": a.agreed, "total": a.total,
         "rate": a.agreed / a.total if a.total else None, "low": a.low, "high": a.high}
        for a in cloud.shadow.agreement
        if a.key in keys
    ]  # fmt: skip


def _settings(config: Config, s: EvalSet, target: float | None = None) -> Settings:
    from sidecar.evaluation.summary import Settings
    from sidecar.router.fitted import config_threshold

    # The config's threshold (by the router's own rule): what a reply is judged by when the
    # daemon does not say (the daemon's own, fitted ones included, come with the replies).
    cloud = config.cloud
    spec = next((t for t in config.tasks if t.name == s.task), None)
    own = spec.threshold if spec is not None and spec.threshold >= 0 else None
    threshold, source = config_threshold(s.kind, cloud, s.task, own)
    return Settings(threshold, source, cloud.enabled, cloud.prompt_price_per_mtok,
                    cloud.completion_price_per_mtok, target)  # fmt: skip


@eval_group.command("export-disagreements")
@click.argument("task")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="CSV file to write (text, cloud, local, confidence, model, time).")  # fmt: skip
@connection_options
@click.pass_context
def export_disagreements(ctx: click.Context, task: str, output: Path, socket: Path | None,
                         tcp: str | None, token: str | None, timeout: float) -> None:  # fmt: skip
    """Write the kept shadow disagreements of TASK (a config task name, or a key such as
    classify:MODEL or extract:MODEL) to a CSV: the cloud's answer beside the local one, the
    next fine-tuning set. Reads the daemon's shadow directory (the path its status names)."""
    import csv
    import io

    from sidecar.cli.support import call
    from sidecar.fileio import write_atomic
    from sidecar.router.shadow import KEEP, known_keys, read_disagreements

    with connect(ctx, socket, tcp, token, timeout) as c:
        cloud = call(c.status).cloud
    if not cloud.HasField("shadow"):
        _fail("the daemon has no cloud configured, so no shadow traffic to export", EXIT_FAILED)
    where = Path(cloud.shadow.directory)
    keys = sorted({a.key for a in cloud.shadow.agreement} | set(known_keys(where)))
    key = task if task in keys else f"task:{task}"
    if key not in keys:
        _fail(f"no shadow data for {task!r} (known: {', '.join(keys) or 'none yet'}); shadow "
              "traffic needs cloud.shadow_rate > 0 and AUTO requests answered locally")  # fmt: skip
    rows = read_disagreements(where, key, KEEP)
    columns = ("text", "cloud", "local", "confidence", "model", "time")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    try:
        write_atomic(output, buf.getvalue().encode())
    except OSError as e:
        _fail(f"cannot write {output}: {e.strerror or e}", EXIT_FAILED)
    click.echo(f"{len(rows)} disagreements of {key} written to {output}", err=True)
