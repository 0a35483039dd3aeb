"""Out of scope, through the few-shot engine on real tiny-model workers: a foreign text gets
no label when the caller allows none, out-of-scope examples are never a label, bad
out-of-scope configuration fails naming what to fix, small request sets stay honest, and a
new set embeds only the texts no cached set holds."""

from __future__ import annotations

import asyncio
import csv
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import make_config, start_app

from sidecar.config import TaskConfig
from sidecar.domain.errors import FailedPrecondition
from sidecar.domain.types import Classification, ClassifyTask
from sidecar.fewshot import embedding

pytestmark = pytest.mark.asyncio

CARDS = [f"my {w} card has not arrived yet {n}" for w in ("new", "debit", "credit", "visa")
         for n in ("today", "this week", "at all", "after ten days", "since monday")]  # fmt: skip
RATES = [f"what is the exchange rate for {c} {n}" for c in ("euros", "dollars", "pounds", "yen")
         for n in ("today", "this week", "now", "at the airport", "online")]  # fmt: skip
FOREIGN = "qzkv xwpj fmbt ghrl"
OTHER = ["what will the weather be like tomorrow", "recommend a good pizza place nearby",
         "who won the football match", "play some relaxing music please"]  # fmt: skip


def write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, ...]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def task(folder: Path, rows: list[tuple[str, str]], **kw: Any) -> TaskConfig:
    path = write_csv(folder / f"{kw.get('name', 'topics')}.csv", rows, ("text", "label"))
    base: dict[str, Any] = dict(name="topics", file=path, text_column="text",
                                label_column="label", cascade=False)  # fmt: skip
    return TaskConfig(**(base | kw))


TOPICS = [(t, "card_arrival") for t in CARDS] + [(t, "exchange_rate") for t in RATES]


async def started(short_dir: Path, tiny_model: Path, *tasks: TaskConfig) -> Any:
    config = make_config(short_dir, tiny_model, workers=1, context=2048)
    return await start_app(replace(config, tasks=tasks), slot_kind="process")


async def ready(app: Any, name: str) -> str:
    for _ in range(1200):
        state: str = app.fewshot.progress.get(name, "")
        if state == "ready" or state.startswith("failed"):
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {name} never finished preparing")


async def classify(app: Any, text: str, **kw: Any) -> Classification:
    r = await app.fewshot.run(app.local.default_model, ClassifyTask(text, (), **kw), "tester")
    assert isinstance(r, Classification)
    return r


async def test_a_foreign_text_gets_no_label_when_the_caller_allows_none(
    short_dir: Path, tiny_model: Path
) -> None:
    app = await started(short_dir, tiny_model, task(short_dir, TOPICS))
    try:
        assert await ready(app, "topics") == "ready"
        # 40 examples, all held out: p can go down to 1/41, below the default 0.05.
        inside = await classify(app, "my visa card has not arrived yet", task="topics",
                                allow_none=True)  # fmt: skip
        assert inside.label == "card_arrival" and not inside.out_of_scope
        assert inside.novelty is not None and inside.novelty < 0.9
        foreign = await classify(app, FOREIGN, task="topics", allow_none=True)
        assert foreign.out_of_scope and foreign.label == ""
        assert foreign.novelty is not None and foreign.novelty > 0.95
        assert [s.label for s in foreign.scores] in (
            ["card_arrival", "exchange_rate"],
            ["exchange_rate", "card_arrival"],
        )  # still listed, best first
        assert foreign.scores[0].probability >= foreign.scores[1].probability
        # Without allow_none the best label is still given, flagged.
        flagged = await classify(app, FOREIGN, task="topics")
        assert flagged.out_of_scope and flagged.label == foreign.scores[0].label
        # scope_alpha 0 turns the cut off (live: retune).
        spec = app.fewshot.tasks["topics"]
        app.fewshot.retune((replace(spec, scope_alpha=0.0),))
        assert app.fewshot.scope_alpha("topics") == 0.0
        off = await classify(app, FOREIGN, task="topics", allow_none=True)
        assert not off.out_of_scope and off.label and off.novelty == foreign.novelty
    finally:
        await app.stop(grace=0)


async def test_out_of_scope_examples_are_never_a_label(short_dir: Path, tiny_model: Path) -> None:
    none_file = write_csv(short_dir / "none.csv", [(t,) for t in OTHER[2:]], ("text",))
    rows = TOPICS + [(t, "other") for t in OTHER[:2]]
    spec = task(short_dir, rows, none_label="other", none_file=none_file)
    app = await started(short_dir, tiny_model, spec)
    try:
        assert await ready(app, "topics") == "ready"
        assert app.fewshot.label_names("topics") == ["card_arrival", "exchange_rate"]
        (built,) = app.fewshot.builds._built.values()
        assert built.clf.none_vectors is not None and len(built.clf.none_vectors) == 4
        for text in OTHER:
            r = await classify(app, text, task="topics")
            assert r.label in ("card_arrival", "exchange_rate")
            assert {s.label for s in r.scores} == {"card_arrival", "exchange_rate"}
            r = await classify(app, text, task="topics", allow_none=True)
            assert r.label in ("", "card_arrival", "exchange_rate")
            assert r.out_of_scope == (r.label == "")
        inside = await classify(app, "what is the exchange rate for yen now", task="topics",
                                allow_none=True)  # fmt: skip
        assert inside.label == "exchange_rate" and not inside.out_of_scope
    finally:
        await app.stop(grace=0)


async def test_bad_out_of_scope_settings_fail_naming_what_to_fix(
    short_dir: Path, tiny_model: Path
) -> None:
    missing = short_dir / "no-such-none.csv"
    one_left = [(t, "card_arrival") for t in CARDS] + [(t, "misc") for t in RATES]
    app = await started(
        short_dir,
        tiny_model,
        task(short_dir, TOPICS, name="nofile", none_file=missing),
        task(short_dir, one_left, name="onelabel", none_label="misc"),
    )
    try:
        assert str(missing) in await ready(app, "nofile")
        with pytest.raises(FailedPrecondition, match=f"cannot read none_file {missing}"):
            await classify(app, "my card", task="nofile")
        state = await ready(app, "onelabel")
        assert "1 label(s) besides none_label 'misc'" in state, state
        with pytest.raises(FailedPrecondition, match="besides none_label 'misc'"):
            await classify(app, "my card", task="onelabel")
    finally:
        await app.stop(grace=0)


async def test_a_small_request_set_never_calls_a_text_out_of_scope(
    short_dir: Path, tiny_model: Path
) -> None:
    app = await started(short_dir, tiny_model)
    try:
        examples = tuple(TOPICS[:6] + TOPICS[20:26])  # 12 examples: p >= 1/13 > 0.05
        r = await classify(app, FOREIGN, examples=examples, allow_none=True)
        assert not r.out_of_scope and r.label
        assert r.novelty is not None and r.novelty <= 1 - 1 / 13 + 1e-9
        more = tuple(TOPICS)  # 40: the floor is 1/41, and the foreign text reaches it
        r = await classify(app, FOREIGN, examples=more, allow_none=True)
        assert r.out_of_scope and r.label == ""
    finally:
        await app.stop(grace=0)


async def test_a_new_set_embeds_only_the_texts_no_cached_set_holds(
    short_dir: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    embedded: list[str] = []
    job = embedding.Embedder._job

    async def counting(self: embedding.Embedder, model: str, batch: tuple[str, ...], caller: str):  # type: ignore[no-untyped-def]
        embedded.extend(batch)
        return await job(self, model, batch, caller)

    monkeypatch.setattr(embedding.Embedder, "_job", counting)
    app = await started(short_dir, tiny_model)
    try:
        first = await classify(app, "my card", examples=tuple(TOPICS))
        assert sorted(embedded) == sorted(t for t, _ in TOPICS)
        embedded.clear()
        edited = (*TOPICS[1:], ("when does my card come", "card_arrival"))
        second = await classify(app, "my card", examples=edited)
        assert embedded == ["when does my card come"]
        assert first.label == second.label == "card_arrival"
        # The reused vectors are the vectors: the same texts give the same classifier input.
        builds = app.fewshot.builds
        a, b = list(builds._built.values())
        assert (a.clf.vectors.shape[0], b.clf.vectors.shape[0]) == (40, 40)
    finally:
        await app.stop(grace=0)
