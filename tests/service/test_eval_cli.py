"""`sidecar eval` against a real daemon on its socket: a Classify CSV on real llama.cpp
(a tiny random model), a config task's held-out file and an Extract CSV on fake workers
(their answers are known, so the scores are too), and every bad input refused with exit 2
before a request is sent."""

from __future__ import annotations

import asyncio
import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from sidecar.cli.commands import main
from sidecar.cli.support import EXIT_CONFIG, EXIT_FAILED
from sidecar.config import TaskConfig

MINI = Path(__file__).parent.parent / "data" / "banking77-mini"


async def cli(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, main, list(args))


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.mark.asyncio
async def test_a_classify_csv_on_real_llama_cpp_reports_what_the_replies_say(
    serve, tiny_model: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model, slot_kind="process", workers=1, context=1024)
    rows = [["my card is lost", "card"], ["send me cash", "cash"], ["card stolen", "card"],
            ["withdraw cash", "cash"], ["where is my card", "card"], ["an atm", "cash"]]  # fmt: skip
    data = write_csv(tmp_path / "set.csv", ["text", "label"], rows)
    out = await cli("eval", str(data), "--json", "--socket", str(s.socket))
    assert out.exit_code == 0, out.output
    r = json.loads(out.stdout)
    assert "eval 6 rows" in out.stderr  # the progress bar's label, on stderr
    # the same requests made directly: the report scores exactly these replies
    replies = [await s.client.classify(t, ("card", "cash"), routing="LOCAL_ONLY") for t, _ in rows]
    right = [rep.label == gold for rep, (_, gold) in zip(replies, rows, strict=True)]
    assert r["rows"] == 6 and r["failed"] == 0 and r["kind"] == "classify"
    assert r["quality"]["accuracy"] == pytest.approx(sum(right) / 6)
    assert r["tokens"]["prompt"] == sum(rep.usage.prompt_tokens for rep in replies)
    assert list(r["models"]) == [f"{replies[0].model.name}@{replies[0].model.version}"]
    c = r["confidence"]
    assert c["rows"] == 6 and len(c["curve"]) == 100
    kept = [rep.confidence.top_probability >= 0.7 for rep in replies]
    assert c["at_threshold"]["coverage"] == pytest.approx(sum(kept) / 6)
    assert r["latency"]["p50_ms"] > 0 and r["rows_per_s"] > 0
    # the table, for people
    out = await cli("eval", str(data), "--socket", str(s.socket))
    assert out.exit_code == 0 and "macro-F1" in out.stdout and "AUROC" in out.stdout


@pytest.mark.asyncio
async def test_a_config_tasks_held_out_file(serve, tiny_model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for name in ("train.csv", "test.csv"):
        shutil.copy(MINI / name, tmp_path / name)
    task = TaskConfig("mini", tmp_path / "train.csv", "text", "category", "", "", 0.5,
                      False, eval_file=tmp_path / "test.csv")  # fmt: skip
    s = await serve(tiny_model, tasks=(task,))
    config = tmp_path / "sidecar.toml"
    config.write_text(
        f'[server]\nsocket = "{s.socket}"\n[models.default]\npath = "{tiny_model}"\n'
        '[tasks.mini]\nfile = "train.csv"\ntext_column = "text"\nlabel_column = "category"\n'
        'eval_file = "test.csv"\nthreshold = 0.5\n'
    )
    for _ in range(600):
        if (await s.client.status()).cloud.tasks.get("mini") == "ready":
            break
        await asyncio.sleep(0.05)
    out = await cli("--config", str(config), "eval", "mini", "--json", "--limit", "40")
    assert out.exit_code == 0, out.output
    r = json.loads(out.stdout)
    assert r["task"] == "mini" and r["rows"] == 40 and r["failed"] == 0
    with (tmp_path / "test.csv").open() as f:
        gold = {row["category"] for row in csv.DictReader(f)}
    assert set(r["quality"]["labels"]) <= gold and len(r["quality"]["labels"]) > 2
    # the task's own threshold, as the daemon reports applying it
    assert r["confidence"]["at_threshold"]["threshold"] == 0.5
    assert r["confidence"]["at_threshold"]["source"] == "tasks.mini.threshold"
    assert r["confusion"]["labels"] and len(r["confusion"]["matrix"]) == len(
        r["confusion"]["labels"]
    )


@pytest.mark.asyncio
async def test_an_extract_csv_is_scored_per_field(serve, tiny_model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Fake workers answer the schema's smallest instance: name "x", people 1.
    s = await serve(tiny_model)
    data = write_csv(tmp_path / "x.csv", ["text", "expected"], [
        ["table for one, Ann", '{"name": "X", "people": 1}'],
        ["Bob, one seat", '{"name": "y", "people": 1}'],
        ["x and a friend", '{"name": "x", "people": 2}'],
    ])  # fmt: skip
    out = await cli("eval", str(data), "--json", "--socket", str(s.socket))
    assert out.exit_code == 0, out.output
    r = json.loads(out.stdout)
    q = r["quality"]
    assert r["kind"] == "extract" and q["exact_match"] == pytest.approx(1 / 3)
    # name: tp 2, fp 1, fn 1; people the same
    assert q["fields"]["name"]["f1"] == pytest.approx(2 / 3) == q["fields"]["people"]["f1"]
    assert r["confidence"]["unit"] == "mean_logprob" and r["confidence"]["rows"] == 3
    # an explicit schema is used as given: the fake then answers "x" for `who` only
    schema = '{"type":"object","properties":{"who":{"type":"string"}},"required":["who"]}'
    out = await cli("eval", str(data), "--schema", schema, "--json", "--socket", str(s.socket))
    assert json.loads(out.stdout)["quality"]["field_f1"] == 0.0


@pytest.mark.asyncio
async def test_a_model_version_the_daemon_does_not_serve_is_refused(
    serve, tiny_model: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model)
    data = write_csv(tmp_path / "c.csv", ["text", "label"], [["a", "x"], ["b", "y"]])
    version = (await s.client.status()).models[0].model.version
    out = await cli("eval", str(data), "--model", "default@0000000", "--socket", str(s.socket))
    assert out.exit_code == EXIT_FAILED and f"serving version {version}" in out.stderr
    out = await cli(
        "eval", str(data), "--model", f"default@{version[:8]}", "--socket", str(s.socket)
    )
    assert out.exit_code == 0, out.output


BAD: list[tuple[str, list[str], list[list[str]] | str, list[str], str]] = [
    # (name, header, rows or raw text, extra arguments, what the message says)
    ("empty", [], "", [], "is empty"),
    ("no label or expected column", ["text", "category"], [["a", "x"]], [],
     "neither a label column 'label'"),
    ("unknown label column", ["text", "category"], [["a", "x"]], ["--label-column", "intent"],
     "no label column 'intent'"),
    ("missing text column", ["body", "label"], [["a", "x"]], [], "no text column 'text'"),
    ("malformed expected JSON", ["text", "expected"], [["a", '{"name": "Ann"']], [],
     "line 2: column 'expected' is not valid JSON"),
    ("expected not an object", ["text", "expected"], [["a", "[1, 2]"]], [],
     "must be a JSON object"),
    ("one label only", ["text", "label"], [["a", "x"], ["b", "x"]], [], "only the label 'x'"),
    ("empty label", ["text", "label"], [["a", "x"], ["b", ""]], [], "line 3: the label is empty"),
    ("header only", ["text", "label"], [], [], "has no labelled rows"),
    ("not UTF-8", [], "text,label\n\xff,x\n", [], "not valid UTF-8"),
    ("unknown task", ["text", "label"], [["a", "x"]], ["--task", "nope"],
     "no task named 'nope' in the config"),
    ("bad schema", ["text", "expected"], [["a", '{"n": 1}']], ["--schema", "{nope"],
     "--schema is not valid JSON"),
]  # fmt: skip


@pytest.mark.parametrize(("header", "rows", "extra", "says"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])  # fmt: skip
def test_bad_input_is_refused_with_exit_2_before_any_request(
    tmp_path: Path, header: list[str], rows: Any, extra: list[str], says: str
) -> None:
    data = tmp_path / "set.csv"
    if isinstance(rows, str):
        data.write_bytes(rows.encode("latin-1"))
    else:
        write_csv(data, header, rows)
    empty = tmp_path / "empty.toml"
    empty.touch()
    # No daemon listens on this socket: the refusal comes before any connection.
    args = ["--config", str(empty), "eval", str(data), *extra, "--socket", str(tmp_path / "no")]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == EXIT_CONFIG, out.output
    assert says in out.stderr, out.stderr


def test_a_target_that_is_neither_a_file_nor_a_task_and_a_task_without_eval_file(
    tmp_path: Path,
) -> None:
    config = tmp_path / "c.toml"
    write_csv(tmp_path / "train.csv", ["text", "label"], [["a", "x"], ["b", "y"]])
    config.write_text(
        f'[models.m]\npath = "{tmp_path / "m.gguf"}"\n[tasks.t]\nfile = "train.csv"\n'
    )
    out = CliRunner().invoke(main, ["--config", str(config), "eval", "nothing.csv"])
    assert (
        out.exit_code == EXIT_CONFIG
        and "neither a CSV file nor a config task (tasks: t)" in out.stderr
    )
    out = CliRunner().invoke(main, ["--config", str(config), "eval", "t"])
    assert out.exit_code == EXIT_CONFIG and "set tasks.t.eval_file" in out.stderr
