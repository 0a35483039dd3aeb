"""Reload over every key of the schema: each change is applied where it is read, or reported
as needing a restart. Walks `schema.each_key()` on one running in-process daemon, so a key
added to the schema later is covered, and fails here until it is wired (a reader in READERS
that sees the new value) or declared restart-only.

For each key: write the baseline config plus a new valid value of that key (derived from
its type, or from SPECIAL), `app.reload(...)`, then

- a live key must be named under "applied" and `READERS[key](app)` (the part of the running
  daemon that reads it) must hold the new value as loaded;
- a restart-only key must be named under "need a restart", and the daemon must still run
  with the old value (its config, and STILL_RUNNING where that is cheap to see);

then reload the baseline and check the old value is back (or, for a restart-only key, that
nothing changed at all). Every problem is collected and the test asserts once, listing all.
(tests/service/test_sighup.py covers the real SIGHUP signal path; this covers the keys.)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest

from sidecar import logs
from sidecar.app import App
from sidecar.config import Config, ModelConfig, Overrides, load
from sidecar.config.schema import KeySpec, base_type, each_key, key
from sidecar.domain.errors import ConfigError
from sidecar.dropwatch import DropWatcher
from sidecar.router.shadow import Shadow

MODEL, OTHER, TASK = "m", "m2", "t"
NAMES = {"models": MODEL, "tasks": TASK}  # the [section.NAME] table each named key is set on
APPLIED, PENDING = "applied", "need a restart (not applied)"  # as sidecar.reload.summary says


# ------------------------------------------------------------------ where live keys are read


def _pool(app: App) -> Any:
    return app.local.pools[MODEL]


def _updater_model(app: App) -> ModelConfig:
    """The model's settings as the updater reads them per poll and per apply."""
    m = app.updater.engine.config.model(MODEL)
    assert m is not None
    return m


def _or_off(threshold: float | None) -> float:
    return -1.0 if threshold is None else threshold  # TaskInfo.threshold: None for -1 (unset)


def _drop(app: App) -> DropWatcher:
    assert app.drop is not None, "the baseline sets store.drop, so the drop watcher runs"
    return app.drop


def _drop_auto_swap(app: App) -> bool:
    return _drop(app).auto_swap


def _swap_setting(name: str) -> Callable[[App], Any]:
    # The Swapper calls its settings callable at each swap (PoolEngine hands it
    # `lambda: self.config.store`): what the next swap will use.
    return lambda app: getattr(app.local.swapper._settings(), name)


def _update_setting(name: str) -> Callable[[App], Any]:
    # The updater, its checks, downloads and probation read `engine.config.update` per use.
    return lambda app: getattr(app.updater.engine.config.update, name)


def _update_identity(app: App) -> str:
    # The rollout hash reads the updater's identity per check and status per call (the one
    # derived from the machine is resolved at start); "" while it uses that one.
    got = app.updater.identity()
    return got.value if got is not None and got.source == "update.identity" else ""


def _routing_setting(name: str) -> Callable[[App], Any]:
    # RouterEngine reads `self.settings` per request (routing, AUTO thresholds, pre-routing).
    return lambda app: getattr(app.router.settings, name)


UPDATE_SETTINGS = (
    "interval_seconds",
    "healthy_seconds",
    "timeout_seconds",
    "retries",
    "fetch_deadline_seconds",
    "fetch_min_bytes_per_second",
    "catalog_origin",  # read by `sidecar pull` (a client), held in the running config
    "catalog_key",
)
SWAP_SETTINGS = ("swap_strategy", "drain_seconds", "swap_wait_seconds")
ROUTING_SETTINGS = (
    "routing",
    "local_timeout_seconds",
    "classify_threshold",
    "classify_margin",
    "classify_none_novelty",
    "extract_mean_logprob",
    "generate_mean_logprob",
    "generate_min_logprob",
    "pre_route_max_chars",
    "pre_route_keywords",
    "pre_route_tasks",
)

# Each live key -> the value the part of the running daemon that reads it sees. A live key
# missing here fails the walk: add where the daemon reads it (not app.config, unless that is
# what is read).
READERS: dict[str, Callable[[App], Any]] = {
    # logs.configure sets the root logger; workers started later copy logs.current().
    "log.format": lambda app: logs.current()[1],
    "log.level": lambda app: logs.current()[0],
    # PoolEngine.check builds its Limits from its config per request.
    "server.max_labels": lambda app: app.local.config.server.max_labels,
    "server.max_embed_texts": lambda app: app.local.config.server.max_embed_texts,
    # App.stop() drains both front ends for this long (it hands the HTTP listener the
    # current value as it closes).
    "server.grace_seconds": lambda app: app.config.server.grace_seconds,
    # The supervisor reads `self.server` per tick and per probe round.
    "server.ping_interval_seconds": lambda app: app.supervisor.server.ping_interval_seconds,
    "server.hang_seconds": lambda app: app.supervisor.server.hang_seconds,
    "server.probe_interval_seconds": lambda app: app.supervisor.server.probe_interval_seconds,
    "server.min_available_mb": lambda app: app.supervisor.server.min_available_mb,
    # The engine reads its budget per load (it takes the reloaded config).
    "server.max_model_memory_mb": lambda app: app.local.config.server.max_model_memory_mb,
    # The pool: the bound of its fair queue, and the RSS ceiling its supervise() reads.
    "models.NAME.max_queue": lambda app: _pool(app).status().queue_limit,
    "models.NAME.max_rss_mb": lambda app: _pool(app).config.max_rss_mb,
    # The residency policy reads the pool's config each supervisor tick.
    "models.NAME.keep_alive": lambda app: _pool(app).resident().keep_alive_s,
    # The swapper reads the pool's config per swap (the gate and its bars), probation per pass.
    "models.NAME.eval": lambda app: _pool(app).config.eval,
    "models.NAME.eval_min_accuracy": lambda app: _pool(app).config.eval_min_accuracy,
    "models.NAME.eval_max_regression": lambda app: _pool(app).config.eval_max_regression,
    "models.NAME.probation_latency_factor": lambda app: _pool(app).config.probation_latency_factor,
    "models.NAME.update_origin": lambda app: _updater_model(app).update_origin,
    "models.NAME.update_key": lambda app: _updater_model(app).update_key,
    **{f"update.{f}": _update_setting(f) for f in UPDATE_SETTINGS},
    "update.identity": _update_identity,
    "store.auto_swap": _drop_auto_swap,
    "store.drop_remove_plaintext": lambda app: _drop(app).remove_plaintext,
    **{f"store.{f}": _swap_setting(f) for f in SWAP_SETTINGS},
    **{f"cloud.{f}": _routing_setting(f) for f in ROUTING_SETTINGS},
    # The budget the router reserves and settles against.
    "cloud.daily_cap": lambda app: app.router.budget.daily_cap,
    "cloud.monthly_cap": lambda app: app.router.budget.monthly_cap,
    "cloud.prompt_price_per_mtok": lambda app: app.router.budget.prices.prompt_per_mtok,
    "cloud.completion_price_per_mtok": lambda app: app.router.budget.prices.completion_per_mtok,
    # The privacy gate the router and the cloud client share.
    "cloud.sensitive": lambda app: app.router.gate.scanner.detector_names,
    "cloud.sensitive_patterns": lambda app: app.router.gate.scanner.patterns,
    "cloud.redact": lambda app: app.router.gate.redact,
    # Shadow traffic: the rate drawn against per request, the cap of its own budget.
    "cloud.shadow_rate": lambda app: _shadow(app).rate,
    "cloud.shadow_daily_cap": lambda app: _shadow(app).budget.daily_cap,
    # The router asks its TaskInfo (the few-shot engine) for a task's own threshold.
    "tasks.NAME.threshold": lambda app: _or_off(app.router.tasks.threshold(TASK)),
    # The router asks it per request when a task's pairs may choose its threshold (0 = off).
    "tasks.NAME.target_accuracy": lambda app: app.router.tasks.target_accuracy(TASK) or 0.0,
    # The few-shot engine reads a task's out-of-scope cut per request.
    "tasks.NAME.scope_alpha": lambda app: app.fewshot.scope_alpha(TASK),
    # Read by `sidecar eval NAME` (a client), held in the running config.
    "tasks.NAME.eval_file": lambda app: (
        next(t for t in app.config.tasks if t.name == TASK).eval_file
    ),
}


def _shadow(app: App) -> Shadow:
    assert app.router.shadow is not None
    return app.router.shadow


# Restart-only keys whose running value is cheap to see: it must stay the old one.
STILL_RUNNING: dict[str, Callable[[App], Any]] = {
    # Baked into each worker's RunnerSpec when the pool starts it.
    "server.default_max_tokens": lambda app: _pool(app).workers()[0].spec.default_max_tokens,
    "models.NAME.workers": lambda app: len(_pool(app).workers()),
    "models.NAME.context": lambda app: _pool(app).spec.context,
    "models.NAME.threads": lambda app: _pool(app).spec.threads,
    "models.NAME.batch": lambda app: _pool(app).spec.batch,
    "models.NAME.parallel": lambda app: _pool(app).spec.parallel,
    "models.NAME.kv_cache": lambda app: _pool(app).spec.kv_cache,
    "default_model": lambda app: app.local.default_model,
    "store.path": lambda app: app.store.root,
    "store.encryption": lambda app: app.store.encrypt,
    # The few-shot engine's task table, fixed at start (its fitted weights depend on it).
    "tasks.NAME.adapter": lambda app: app.fewshot.tasks[TASK].adapter,
}


# ------------------------------------------------------------------ new values


@dataclass(frozen=True)
class Value:
    """A key's new TOML value, and the keys the loader requires beside it."""

    value: Any
    also: dict[str, Any] = field(default_factory=dict)  # concrete TOML name -> TOML value


@dataclass
class Site:
    """The config file and what it points at, in a short temp dir."""

    dir: Path
    model: Path
    path: Path
    baseline: dict[str, Any]

    @classmethod
    def make(cls, d: Path, model: Path) -> Site:
        examples = [f"my card is {w} {i},{w}" for w in ("lost", "found") for i in range(3)]
        (d / "t.csv").write_text("text,label\n" + "\n".join(examples) + "\n")
        (d / "drop").mkdir()
        baseline = {
            "": {"default_model": MODEL},
            "server": {"socket": str(d / "s.sock"), "grace_seconds": 0},
            "store": {"path": str(d / "store"), "drop": str(d / "drop")},
            "models": {n: {"path": str(model), "workers": 1} for n in (MODEL, OTHER)},
            "tasks": {TASK: {"file": "t.csv"}},
        }
        return cls(d, model, d / "c.toml", baseline)

    def write(self, changes: dict[str, Any] | None = None) -> None:
        doc = json.loads(json.dumps(self.baseline))  # a deep copy
        for name, value in (changes or {}).items():
            section, entry, fld = _split(name)
            table = doc.setdefault(section, {})
            if entry:
                table = table.setdefault(entry, {})
            table[fld] = value
        self.path.write_text(_toml(doc))

    def load(self) -> Config:
        return load(Overrides(config=self.path), env={})


def _split(name: str) -> tuple[str, str, str]:
    """'server.x' -> (server, '', x); 'models.m.x' -> (models, m, x); 'x' -> ('', '', x)."""
    if "." not in name:
        return "", "", name
    section, rest = name.split(".", 1)
    entry, _, fld = rest.rpartition(".")
    return section, entry, fld


def _toml(doc: dict[str, Any]) -> str:
    def v(x: Any) -> str:
        if isinstance(x, bool):
            return "true" if x else "false"
        if isinstance(x, (int, float)):
            return repr(x)
        if isinstance(x, (list, tuple)):
            return "[" + ", ".join(v(i) for i in x) + "]"
        return json.dumps(str(x))  # a TOML basic string

    def rows(table: dict[str, Any]) -> list[str]:
        return [f"{k} = {v(x)}" for k, x in table.items()]

    lines = rows(doc.get("", {}))
    for section, table in doc.items():
        if not section:
            continue
        if section in NAMES:
            for entry, body in table.items():
                lines += [f"[{section}.{entry}]", *rows(body)]
        else:
            lines += [f"[{section}]", *rows(table)]
    return "\n".join(lines) + "\n"


def _copy(site: Site, src: Path, name: str) -> str:
    dst = site.dir / name
    if not dst.exists():
        shutil.copy(src, dst)
    return str(dst)


# Keys whose new value needs care: paths, checked strings, companions the loader requires.
# Every other key gets one from its type (see `_new_value`).
SPECIAL: dict[str, Callable[[Site], Value]] = {
    "default_model": lambda s: Value(OTHER),
    "server.socket": lambda s: Value(str(s.dir / "t.sock")),
    "server.tcp_port": lambda s: Value(47001, {"server.tcp_token": "reload-token"}),
    "server.tcp_host": lambda s: Value("localhost"),
    "metrics.host": lambda s: Value("localhost"),
    "metrics.socket": lambda s: Value(str(s.dir / "m.sock")),
    "http.port": lambda s: Value(47002, {"http.token": "reload-token"}),
    "http.host": lambda s: Value("localhost"),
    "http.socket": lambda s: Value(str(s.dir / "h.sock")),
    "store.path": lambda s: Value(str(s.dir / "store2")),
    "store.drop": lambda s: Value(str(s.dir / "drop2")),
    "store.key": lambda s: Value("ab" * 32),
    "store.key_file": lambda s: Value(str(s.dir / "store.key")),
    "store.previous_key_file": lambda s: Value(str(s.dir / "old.key")),
    "cloud.base_url": lambda s: Value("http://127.0.0.1:9/v1", {"cloud.model": "reload-model"}),
    "cloud.sensitive": lambda s: Value(["email"]),
    "cloud.pre_route_tasks": lambda s: Value(["chat"]),
    "models.NAME.path": lambda s: Value(_copy(s, s.model, "tiny2.gguf")),
    "tasks.NAME.file": lambda s: Value(_copy(s, s.dir / "t.csv", "t2.csv")),
    "tasks.NAME.model": lambda s: Value(OTHER),
    "tasks.NAME.none_file": lambda s: Value(_copy(s, s.dir / "t.csv", "none.csv")),
    "tasks.NAME.eval_file": lambda s: Value(_copy(s, s.dir / "t.csv", "held-out.csv")),
    # The gate needs a task with a golden set.
    "models.NAME.eval": lambda s: Value(
        TASK, {f"tasks.{TASK}.eval_file": _copy(s, s.dir / "t.csv", "golden.csv")}
    ),
}


def _toml_form(x: Any) -> Any:
    if isinstance(x, tuple):
        return list(x)
    if x is None:
        return ""
    return str(x) if isinstance(x, Path) else x


def _new_value(spec: KeySpec, current: Any, site: Site) -> Value | None:
    """A valid value other than `current` (as loaded), or None when the type gives none."""
    if spec.name in SPECIAL:
        return SPECIAL[spec.name](site)
    tp = base_type(spec)
    now = _toml_form(current)
    candidates: list[Any] = []
    if tp is bool:
        candidates = [not now]
    elif get_origin(tp) is Literal:
        candidates = list(get_args(tp))
    elif tp is int:
        candidates = [now + 1, 1, 2, 1024, 65536]
    elif tp is float:
        candidates = [now + 1.0, 0.5, 0.25, 1.0, 2.0]
    elif tp is str:
        candidates = [now + "x", "x"]
    elif get_origin(tp) is tuple:
        candidates = [now[:1], [*now, "x"], ["x"]] if len(now) > 1 else [[*now, "x"], ["x"]]
    for c in candidates:  # Path and anything new: none, so SPECIAL must say
        typed = tuple(c) if isinstance(c, list) else c
        if c != now and spec.check(typed) is None:
            return Value(c)
    return None


# ------------------------------------------------------------------ the walk


def _concrete(spec: KeySpec) -> str | None:
    """The key as the reload names it: models.m.max_queue, tasks.t.threshold."""
    if not spec.named:
        return spec.name
    entry = NAMES.get(spec.section)
    return None if entry is None else spec.name.replace(".NAME.", f".{entry}.")


def _value_of(config: Config, spec: KeySpec) -> Any:
    holder: Any = config
    if spec.section:
        holder = getattr(config, spec.section)
    if spec.named:
        holder = next(e for e in holder if e.name == NAMES[spec.section])
    return getattr(holder, spec.field)


def _norm(x: Any) -> Any:
    return tuple(x) if isinstance(x, (list, tuple)) else x


def _parse(note: str) -> tuple[set[str], set[str]] | None:
    """(applied, need a restart) from `app.last_reload`; None when it is not a summary."""
    if note == "no changes":
        return set(), set()
    parts: dict[str, set[str]] = {APPLIED: set(), PENDING: set()}
    for part in note.split("; "):
        head, sep, rest = part.partition(": ")
        if not sep or head not in parts:
            return None
        parts[head] = set(rest.split(", "))
    return parts[APPLIED], parts[PENDING]


def walk(app: App, site: Site, keys: Iterable[KeySpec]) -> list[str]:
    """Change each key on the running `app`, reload, check, reload the baseline, check again.
    Every problem found, each starting with the key it is about."""
    problems: list[str] = []
    site.write()
    base = site.load()
    for spec in keys:
        name = _concrete(spec)
        if name is None:
            problems.append(
                f"{spec.name}: no [{spec.section}.NAME] table in the baseline: add one to NAMES "
                "and Site.make"
            )
            continue
        old = _value_of(base, spec)
        change = _new_value(spec, old, site)
        if change is None:
            problems.append(
                f"{name}: no valid new value follows from its type ({spec.type_name}): "
                "add one to SPECIAL"
            )
            continue
        site.write({name: change.value, **change.also})
        try:
            new = site.load()
        except ConfigError as e:
            problems.append(
                f"{name}: the new value {change.value!r} does not load ({e}): fix SPECIAL"
            )
            continue
        want = _norm(_value_of(new, spec))

        app.reload(site.load)
        note = app.last_reload
        said = _parse(note)
        if said is None:
            problems.append(f"{name}: the reload said {note!r}")
            continue
        applied, pending = said
        if applied | pending != {name, *change.also}:
            problems.append(f"{name}: the reload named {note!r}, not just {name} and {change.also}")
        reader = READERS.get(spec.name)
        if spec.live:
            if name not in applied:
                problems.append(f"{name}: declared live, but the reload did not apply it: {note!r}")
            if reader is None:
                problems.append(
                    f"{name}: declared live, but READERS does not say where the daemon reads it: "
                    f"add {spec.name!r} to READERS in {Path(__file__).name}"
                )
            elif (got := _norm(reader(app))) != want:
                problems.append(
                    f"{name}: applied, but the part that reads it still has {got!r}, not "
                    f"{want!r}: hand it over in App.apply, or declare it restart-only (live=False)"
                )
        else:
            if name not in pending:
                problems.append(f"{name}: needs a restart, but the reload did not say so: {note!r}")
            if _norm(_value_of(app.config, spec)) != _norm(old):
                problems.append(f"{name}: restart-only, yet the running config took {want!r}")
            still = STILL_RUNNING.get(spec.name)
            if still is not None and (got := _norm(still(app))) != _norm(old):
                problems.append(
                    f"{name}: restart-only, yet the daemon now runs {got!r}, not {old!r}"
                )

        # Back to the baseline: what was applied is undone, a restart-only change never was.
        site.write()
        app.reload(site.load)
        back = _parse(app.last_reload)
        if back != (applied, set()):
            problems.append(
                f"{name}: reloading the baseline said {app.last_reload!r}, expected "
                f"{'applied: ' + ', '.join(sorted(applied)) if applied else 'no changes'}"
            )
        if spec.live and reader is not None and (got := _norm(reader(app))) != _norm(old):
            problems.append(
                f"{name}: after reloading the baseline its reader has {got!r}, not {old!r}"
            )
    return problems


# ------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """Reloads reconfigure the root logger (log.level, log.format): put pytest's back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
async def daemon(short_dir: Path, tiny_model: Path) -> AsyncIterator[tuple[App, Site]]:
    site = Site.make(short_dir, tiny_model)
    site.write()
    app = App(site.load(), slot_kind="fake")
    await app.start()
    try:
        yield app, site
    finally:
        await app.stop(grace=0)


# ------------------------------------------------------------------ the tests


async def test_every_key_is_applied_where_it_is_read_or_named_as_needing_a_restart(
    daemon: tuple[App, Site],
) -> None:
    app, site = daemon
    keys = list(each_key())
    problems = walk(app, site, keys)
    assert not problems, f"{len(problems)} problem(s) over {len(keys)} keys:\n" + "\n".join(
        problems
    )


def test_the_tables_name_only_keys_of_the_schema_in_the_right_role() -> None:
    # A key made restart-only (or renamed, or removed) must leave READERS, and so on: the
    # tables say what the daemon does, not what it once did.
    live = {k.name for k in each_key() if k.live}
    restart = {k.name for k in each_key() if not k.live}
    assert set(READERS) <= live, f"in READERS but not live: {sorted(set(READERS) - live)}"
    assert set(STILL_RUNNING) <= restart, sorted(set(STILL_RUNNING) - restart)
    assert set(SPECIAL) <= live | restart, sorted(set(SPECIAL) - live - restart)
    for spec in each_key():
        assert not spec.named or spec.section in NAMES, spec.name


def _skip_supervisor(monkeypatch: pytest.MonkeyPatch) -> list[KeySpec]:
    """App.apply 'forgets' the supervisor: its server settings stay the old ones."""
    original = App.apply

    def apply(self: App, merged: Config) -> None:
        kept = self.supervisor.server
        original(self, merged)
        self.supervisor.server = kept

    monkeypatch.setattr(App, "apply", apply)
    return [key("server.hang_seconds"), key("server.max_labels")]


def _no_reader(monkeypatch: pytest.MonkeyPatch) -> list[KeySpec]:
    monkeypatch.delitem(READERS, "cloud.redact")
    return [key("cloud.redact")]


def _no_value(monkeypatch: pytest.MonkeyPatch) -> list[KeySpec]:
    monkeypatch.delitem(SPECIAL, "cloud.pre_route_tasks")
    return [key("cloud.pre_route_tasks")]


def _declared_live_not_wired(monkeypatch: pytest.MonkeyPatch) -> list[KeySpec]:
    # As if a key were added live to the schema walk without reload or a reader knowing it.
    return [dataclasses.replace(key("cloud.retries"), live=True)]


def _restart_key_applied(monkeypatch: pytest.MonkeyPatch) -> list[KeySpec]:
    """App.apply takes a restart-only value anyway (default_model, in its config)."""
    original = App.apply

    def apply(self: App, merged: Config) -> None:
        original(self, dataclasses.replace(merged, default_model=OTHER))

    monkeypatch.setattr(App, "apply", apply)
    return [key("default_model")]


@pytest.mark.parametrize(
    ("breaks", "caught"),
    [
        (_skip_supervisor, "server.hang_seconds: applied, but the part that reads it still has"),
        (_no_reader, "cloud.redact: declared live, but READERS does not say"),
        (_no_value, "cloud.pre_route_tasks: no valid new value"),
        (_declared_live_not_wired, "cloud.retries: declared live, but the reload did not apply"),
        (_restart_key_applied, "default_model: restart-only, yet the running config took"),
    ],
    ids=[
        "reader-keeps-old-value",
        "live-key-without-reader",
        "no-value",
        "live-not-applied",
        "restart-key-applied",
    ],
)
async def test_the_walk_catches(
    daemon: tuple[App, Site],
    monkeypatch: pytest.MonkeyPatch,
    breaks: Callable[[pytest.MonkeyPatch], list[KeySpec]],
    caught: str,
) -> None:
    app, site = daemon
    keys = breaks(monkeypatch)
    problems = walk(app, site, keys)
    assert any(p.startswith(caught) for p in problems), problems
    if breaks is _skip_supervisor:  # a key the break does not touch still passes
        assert not [p for p in problems if p.startswith("server.max_labels")], problems
