"""`sidecar eval --fit-threshold` on a real daemon: the fitted threshold is written where the
daemon reads it, and the daemon routes by it (an AUTO request whose confidence lies between
the configured and the fitted threshold changes hands, and its route says which threshold
applied and where it came from); a target no threshold reaches writes nothing.

Fake workers answer Classify by character overlap (a softmax over how many of each label's
letters the text holds), so each row's confidence, and whether it is right, is chosen here:
with labels "abcdef" and "uvwxyz", a text with 3/2/1 more letters of one label gets that label
at 0.953/0.881/0.731.
"""

from __future__ import annotations

import asyncio
import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from fake_cloud import Script, fake_cloud, ok

from sidecar.cli.commands import main
from sidecar.cli.support import EXIT_FAILED

A, B = "abcdef", "uvwxyz"
PROBE = "ab 99"  # confidence 0.881: above the configured 0.7, below the fitted 0.953


@pytest.fixture
def cloud() -> Iterator[tuple[str, Script]]:
    with fake_cloud() as c:
        yield c


def rows(sure_wrong: int) -> list[list[str]]:
    """20 rows at 0.953 (`sure_wrong` of them wrong), then 10 at 0.881 and 10 at 0.731, half
    of each wrong."""
    out = []
    for i in range(40):
        text, wrong = (
            ("abc", i < sure_wrong) if i < 20 else ("ab", i % 2) if i < 30 else ("a", i % 2)
        )
        out.append([f"{text} {i}", B if wrong else A])
    return out


async def cli(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, main, list(args))


async def test_a_fitted_threshold_is_used_by_the_daemon_and_said_in_the_route(
    serve, tiny_model: Path, tmp_path: Path, cloud: tuple[str, Script]
) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.default = ok(B)
    s = await serve(tiny_model, cloud={"base_url": url, "model": "m", "retries": 0,
                                       "classify_threshold": 0.7})  # fmt: skip
    data = tmp_path / "set.csv"
    with data.open("w", newline="") as f:
        csv.writer(f).writerows([["text", "label"], *rows(sure_wrong=0)])
    empty = tmp_path / "empty.toml"
    empty.touch()

    before = await s.client.classify(PROBE, (A, B), routing="AUTO")
    assert before.route.served_by == "local" and before.label == A
    assert before.route.threshold == 0.7
    assert before.route.threshold_source == "cloud.classify_threshold"

    out = await cli("--config", str(empty), "eval", str(data), "--target-accuracy", "0.9",
                    "--fit-threshold", "--json", "--socket", str(s.socket))  # fmt: skip
    assert out.exit_code == 0, out.output
    fit = json.loads(out.stdout)["confidence"]["fitted"]
    model = before.model.name
    assert fit["key"] == f"classify:{model}" and fit["reached"]
    assert fit["threshold"] == pytest.approx(0.9526, abs=1e-3)
    assert fit["coverage"] == 0.5 and fit["accuracy"] == 1.0 and fit["rows"] == 40
    saved = json.loads(Path(fit["written_to"]).read_text())["thresholds"][f"classify:{model}"]
    assert saved["target_accuracy"] == 0.9 and saved["rows"] == 40 and saved["kept_local"] == 0.5
    assert Path(fit["written_to"]) == s.config.store.path / "router" / "thresholds.json"

    # The daemon notices the file within a second, no signal needed.
    for _ in range(60):
        after = await s.client.classify(PROBE, (A, B), routing="AUTO")
        if after.route.served_by == "cloud":
            break
        await asyncio.sleep(0.05)
    assert after.route.served_by == "cloud" and after.label == B, after.route
    assert after.route.reason_code == "low_confidence"
    assert after.route.threshold == pytest.approx(fit["threshold"])
    assert after.route.threshold_source.startswith(f"fitted (classify:{model}: target accuracy 0.9")
    # A sure answer stays local, held to the fitted threshold too.
    sure = await s.client.classify("abc 99", (A, B), routing="AUTO")
    assert sure.route.served_by == "local" and sure.route.threshold == after.route.threshold
    status = await s.client.status()
    assert status.cloud.thresholds_file == fit["written_to"]
    assert status.cloud.fitted_thresholds[f"classify:{model}"].startswith("0.95")

    # The table says the same for people.
    out = await cli("--config", str(empty), "eval", str(data), "--target-accuracy", "0.9",
                    "--socket", str(s.socket))  # fmt: skip
    line = next(x for x in out.stdout.splitlines() if "for accuracy 0.9" in x)
    assert line.split()[-5:] == ["0.9526", "/", "0.500", "/", "1.000"], out.stdout
    # ...and judges the rows at the threshold the daemon now applies, not the config's 0.7
    line = next(x for x in out.stdout.splitlines() if "at the daemon's threshold" in x)
    assert "0.9526 (fitted" in line and line.split()[-3:] == ["0.500", "/", "1.000"], line


async def test_an_unreachable_target_says_the_best_and_writes_nothing(
    serve, tiny_model: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model)
    data = tmp_path / "set.csv"
    with data.open("w", newline="") as f:
        csv.writer(f).writerows([["text", "label"], *rows(sure_wrong=5)])
    empty = tmp_path / "empty.toml"
    empty.touch()
    out = await cli("--config", str(empty), "eval", str(data), "--target-accuracy", "0.9",
                    "--fit-threshold", "--socket", str(s.socket))  # fmt: skip
    assert out.exit_code == EXIT_FAILED, out.output
    # the surest 20 rows are 15 right: 0.75 is the best any threshold keeps
    assert (
        "no threshold reaches accuracy 0.9 on this set; the best any threshold keeps is 0.750"
        in (out.stderr)
    )
    assert "unreachable: the best any threshold keeps is 0.750" in out.stdout
    assert not (s.config.store.path / "router" / "thresholds.json").exists()


def _args(tmp_path: Path, n: int, *extra: str) -> list[str]:
    data = tmp_path / "set.csv"
    with data.open("w", newline="") as f:
        csv.writer(f).writerows([["text", "label"], *rows(0)[:n]])
    empty = tmp_path / "empty.toml"
    empty.touch()
    return ["--config", str(empty), "eval", str(data), *extra, "--socket", str(tmp_path / "no")]


BAD: list[tuple[str, int, list[str], str]] = [
    ("zero", 40, ["--target-accuracy", "0"], "--target-accuracy must be in (0, 1]"),
    ("above one", 40, ["--target-accuracy", "1.5"], "not 1.5"),
    ("no target", 40, ["--fit-threshold"], "--fit-threshold needs --target-accuracy"),
    ("routed", 40, ["--fit-threshold", "--target-accuracy", "0.9", "--routing", "AUTO"],
     "needs --routing LOCAL_ONLY"),
    ("too few rows", 29, ["--fit-threshold", "--target-accuracy", "0.9"],
     "needs at least 30 rows, this set has 29"),
]  # fmt: skip


@pytest.mark.parametrize(("n", "extra", "says"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_fit_that_cannot_be_right_is_refused_before_any_request(
    tmp_path: Path, n: int, extra: list[str], says: str
) -> None:
    # No daemon listens on the socket: the refusal comes before any connection.
    out: Any = CliRunner().invoke(main, _args(tmp_path, n, *extra))
    assert out.exit_code == 2, out.output
    assert says in out.stderr, out.stderr


async def test_compare_puts_local_and_cloud_side_by_side_and_never_sends_private_rows(
    serve, tiny_model: Path, tmp_path: Path, cloud: tuple[str, Script]
) -> None:  # type: ignore[no-untyped-def]
    url, script = cloud
    script.default = ok(B, prompt=100, completion=5)
    s = await serve(tiny_model, cloud={"base_url": url, "model": "m", "retries": 0,
                                       "prompt_price_per_mtok": 1.0,
                                       "completion_price_per_mtok": 2.0})  # fmt: skip
    data = tmp_path / "set.csv"
    rows = [
        ["abc one", A, ""],  # local A (right), cloud B
        ["uvw two", B, "no"],  # both B: agree
        ["ab three", B, "false"],  # local A, cloud B (right)
        ["abc four private", A, "true"],  # marked sensitive: never sent
        ["a mail to jo.doe@example.com", A, ""],  # the daemon's scan finds an e-mail
        ["uvw 5", B, "0"],
        ["au 7", B, ""],  # a tie: local A at 0.5, under the threshold 0.7; cloud B (right)
    ]
    with data.open("w", newline="") as f:
        csv.writer(f).writerows([["text", "label", "sensitive"], *rows])
    empty = tmp_path / "empty.toml"
    empty.touch()
    out = await cli("--config", str(empty), "eval", str(data), "--routing", "compare", "--json",
                    "--socket", str(s.socket))  # fmt: skip
    assert out.exit_code == 0, out.output
    r = json.loads(out.stdout)
    m = r["compare"]
    assert r["routing"] == "compare" and r["served_by"] == {"local": 7}
    assert m["sent"] == 5 and m["kept_local_private"] == 2 and m["cloud_failed"] == 0
    assert m["private_lines"] == [5, 6]
    # never received: neither row's text, nor more requests than rows sent
    assert len(script.received) == 5
    assert not script.seen("private") and not script.seen("jo.doe")
    assert script.seen("uvw 5")
    # sent rows: local A, B, A, B, A vs cloud B everywhere
    assert m["agreement"] == 0.4
    assert m["local_accuracy_on_sent"] == 0.6 and m["cloud_accuracy_on_sent"] == 0.8
    call = (100 * 1.0 + 5 * 2.0) / 1e6  # the fake's usage at the configured prices
    assert m["cloud_cost"] == pytest.approx(5 * call)
    # AUTO at 0.7 escalates the tie only, and the cloud gets it right: 6 of 7
    assert m["auto_escalated"] == pytest.approx(1 / 7) and m["auto_accuracy"] == pytest.approx(
        6 / 7
    )
    assert m["auto_cloud_cost"] == pytest.approx(call)
    assert r["quality"]["accuracy"] == pytest.approx(5 / 7)  # the local answers, every row
    assert r["confidence"]["at_threshold"]["cloud"] is True
    out = await cli("--config", str(empty), "eval", str(data), "--routing", "compare",
                    "--socket", str(s.socket))  # fmt: skip
    assert "kept local by the privacy rules (lines)" in out.stdout and "5, 6" in out.stdout


async def test_compare_without_a_cloud_and_a_bad_sensitive_flag_are_refused(
    serve, tiny_model: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model)
    empty = tmp_path / "empty.toml"
    empty.touch()
    data = tmp_path / "set.csv"
    data.write_text(f"text,label\nabc,{A}\nuvw,{B}\n")
    out = await cli("--config", str(empty), "eval", str(data), "--routing", "compare",
                    "--socket", str(s.socket))  # fmt: skip
    assert out.exit_code == EXIT_FAILED and "needs a cloud" in out.stderr, out.output
    data.write_text(f"text,label,sensitive\nabc,{A},maybe\n")
    out = await cli("--config", str(empty), "eval", str(data), "--socket", str(s.socket))
    assert out.exit_code == 2
    assert "line 2: column 'sensitive' must be true or false, not 'maybe'" in out.stderr


async def test_a_fitted_threshold_stops_applying_when_another_version_serves(
    serve, tiny_model: Path, tmp_path: Path, cloud: tuple[str, Script]
) -> None:  # type: ignore[no-untyped-def]
    from tiny_gguf import write_tiny_llama

    from sidecar.router import fitted
    from sidecar.v1 import inference_pb2 as pb

    url, script = cloud
    script.default = ok(B)
    s = await serve(tiny_model, cloud={"base_url": url, "model": "m", "retries": 0,
                                       "classify_threshold": 0.7})  # fmt: skip
    status = await s.client.status()
    ref = status.models[0].model
    path = Path(status.cloud.thresholds_file)
    fitted.save(path, f"classify:{ref.name}",
                fitted.Fitted(0.95, 0.9, 1.0, 0.5, 40, f"{ref.name}@{ref.version}"))  # fmt: skip
    s.running.router.fitted.reload()  # the watch would within a second
    held = await s.client.classify(PROBE, (A, B), routing="AUTO")
    assert held.route.served_by == "cloud" and held.route.threshold == pytest.approx(0.95)

    second = write_tiny_llama(tmp_path / "tiny2.gguf", seed=2, n_ctx=4096)
    steps = [p async for p in s.client.admin.Swap(pb.SwapRequest(path=str(second)))]
    assert steps[-1].ok, steps[-1]
    after = await s.client.classify(PROBE, (A, B), routing="AUTO")
    assert after.model.version != ref.version
    assert after.route.served_by == "local" and after.label == A, after.route
    assert after.route.threshold == 0.7
    assert after.route.threshold_source == "cloud.classify_threshold"
    line = (await s.client.status()).cloud.fitted_thresholds[f"classify:{ref.name}"]
    assert line == (
        f"0.95 stale (fitted on {ref.name}@{ref.version}, serving {ref.name}@{after.model.version})"
    )


async def test_a_labels_alone_fit_does_not_apply_to_classify_by_inline_examples(
    serve, tiny_model: Path, cloud: tuple[str, Script]
) -> None:  # type: ignore[no-untyped-def]
    from sidecar.router import fitted

    url, script = cloud
    script.default = ok(B)
    s = await serve(tiny_model, cloud={"base_url": url, "model": "m", "retries": 0,
                                       "classify_threshold": 0.7})  # fmt: skip
    status = await s.client.status()
    ref = status.models[0].model
    fitted.save(Path(status.cloud.thresholds_file), f"classify:{ref.name}",
                fitted.Fitted(0.95, 0.9, 1.0, 0.5, 40, f"{ref.name}@{ref.version}"))  # fmt: skip
    s.running.router.fitted.reload()
    labels_alone = await s.client.classify(PROBE, (A, B), routing="AUTO")
    assert labels_alone.route.threshold_source.startswith(f"fitted (classify:{ref.name}")
    examples = [(f"{A} {i}", A) for i in range(4)] + [(f"{B} {i}", B) for i in range(4)]
    by_examples = await s.client.classify(PROBE, examples=examples, routing="AUTO")
    assert by_examples.route.threshold == 0.7, by_examples.route
    assert by_examples.route.threshold_source == "cloud.classify_threshold"


async def test_a_fit_never_overwrites_a_damaged_thresholds_file(
    serve, tiny_model: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    s = await serve(tiny_model)
    path = s.config.store.path / "router" / "thresholds.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"version": 1, "thresholds": {"task:mine": {"threshold": 0.8,')  # cut short
    data = tmp_path / "set.csv"
    with data.open("w", newline="") as f:
        csv.writer(f).writerows([["text", "label"], *rows(sure_wrong=0)])
    empty = tmp_path / "empty.toml"
    empty.touch()
    out = await cli("--config", str(empty), "eval", str(data), "--target-accuracy", "0.9",
                    "--fit-threshold", "--socket", str(s.socket))  # fmt: skip
    assert out.exit_code == EXIT_FAILED, out.output
    assert f"nothing written: {path}" in out.stderr and "fix or remove the file" in out.stderr
    assert path.read_text().endswith('"threshold": 0.8,')
