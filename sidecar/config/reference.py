"""The schema as people read it: `sidecar config --keys` lines and docs/configuration.md.

`scripts/gen_config_docs.py` writes `markdown()` to docs/configuration.md; a unit test
fails when the file differs from it, so the reference cannot drift from the schema.
"""

from __future__ import annotations

import json
from typing import Any

from sidecar.config.schema import SECTIONS, KeySpec, Section, each_key

HEADER = """\
# Configuration reference

<!-- GENERATED from sidecar/config/schema.py by scripts/gen_config_docs.py: do not edit.
     Change a key's declaration there, then run: .venv/bin/python scripts/gen_config_docs.py -->

Every key the daemon reads, generated from the one schema (`sidecar/config/schema.py`) that
the loader, `sidecar config --keys` and SIGHUP reload also read. [Back to the README](../README.md).

**Layering.** Each key takes its default, then the value in the TOML file, then its
environment variable, then a CLI flag, each overriding the one before. The file is
`--config PATH`, else `SIDECAR_CONFIG`, else the platformdirs config path
(`~/.config/sidecar/config.toml` on Linux). `--config` works before or after the
subcommand (`sidecar serve --config X`); given in both places, the one after the subcommand
wins. `sidecar config` shows the result and where it came from; `sidecar config --keys` lists
the keys below.

**Environment.** `SIDECAR_<SECTION>_<KEY>` for the keys of the plain tables (e.g.
`SIDECAR_HTTP_TOKEN`; lists comma-separated; booleans `1/0`, `true/false`, `yes/no`,
`on/off`), `SIDECAR_DEFAULT_MODEL`, and `SIDECAR_MODEL_<KEY>` for the default model's keys
(e.g. `SIDECAR_MODEL_PATH`; with no model configured they define one named `default`).
`[tasks.NAME]` keys are set in the file only. Nothing else in sidecar reads the environment.

**Flags.** `--socket`, `--tcp-port`, `--log-format`, `--log-level`, `--http-port`,
`--http-socket` and `--store` set the matching key; `--model` names a configured model or a
GGUF file (which becomes the default model's `path`); `--workers`, `--threads` and
`--context` set the default model's keys.

**Clients.** Client commands (`status`, `classify`, `models`, `update`, ...) and the Python
`Client()` read only what finds the daemon: `server.socket` and, over TCP,
`server.tcp_token`. The daemon's own checks (`http.token` required with `http.port`, the
cloud, model files) do not apply to them, so a service's config whose secrets live in the
service's environment works for clients as it is. With no `--config` and no
`SIDECAR_CONFIG`, clients read the user config file, or if there is none,
`/etc/sidecar/config.toml` (the system service's); the daemon itself never falls back to
`/etc/sidecar`. `sidecar config` prints where clients will look.

**Errors** name the TOML key (`server.tcp_port: expected int, got str 'eighty'`); an
unknown key or table is an error that lists the known ones. The daemon does not start with
an invalid file, and a reload with one changes nothing.

**Reload.** On SIGHUP the daemon reads the configuration again. A key marked *live* takes
its new value without a restart; any other change is logged and shown in `sidecar status`
as needing a restart (never silently ignored). Adding or removing a `[models.NAME]` or
`[tasks.NAME]` table needs a restart.

```toml
default_model = "classifier"

[server]
socket = "/run/sidecar/sidecar.sock"
socket_group_access = true

[log]
format = "json"

[models.classifier]
path = "/var/lib/sidecar/SmolLM2-135M-Instruct.Q4_1.gguf"
workers = 2
threads = 1

[models.chat]
path = "/var/lib/sidecar/gemma-3-270m-q4_k_m.gguf"
context = 4096
```
"""

SECTION_TITLES = {"": "Top-level keys"}


def shown_default(spec: KeySpec) -> Any:
    """The default as `config --keys` prints it: the TOML value (a list, not a tuple)."""
    return list(spec.default) if isinstance(spec.default, tuple) else spec.default


def key_line(spec: KeySpec) -> str:
    """One `sidecar config --keys` line: `name (type, default X): doc`."""
    return f"{spec.name} ({spec.type_name}, default {shown_default(spec)!r}): {spec.doc}"


def _toml(spec: KeySpec) -> str:
    if spec.required:
        return "required"
    if spec.setting.fallback is not None:
        return "derived"
    return f"`{json.dumps(shown_default(spec))}`"


def _cell(text: str) -> str:
    # A `|` would end the cell; `<dir>` would be read as an HTML tag and vanish.
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _type(spec: KeySpec) -> str:
    bound = spec.setting.minimum
    return spec.type_name + (f", min {bound:g}" if bound is not None else "")


def _section_doc(section: Section) -> str:
    if not section.name:
        return "Outside any table."
    doc = (section.cls.__doc__ or "").strip()
    if section.named:
        doc += f" One `[{section.name}.NAME]` table each."
    return doc


def markdown() -> str:
    """docs/configuration.md, from the schema."""
    out = [HEADER]
    by_section: dict[str, list[KeySpec]] = {}
    for spec in each_key():
        by_section.setdefault(spec.section, []).append(spec)
    for section in SECTIONS:
        title = SECTION_TITLES.get(section.name) or (
            f"[{section.name}.NAME]" if section.named else f"[{section.name}]"
        )
        out.append(f"\n## {title}\n\n{_section_doc(section)}\n")
        out.append("| key | type | default | environment | on SIGHUP | meaning |")
        out.append("|---|---|---|---|---|---|")
        for spec in by_section.get(section.name, []):
            env = f"`{spec.env}`" if spec.env else "(none)"
            live = "live" if spec.live else "restart"
            out.append(
                f"| `{spec.name}` | {_cell(_type(spec))} | {_cell(_toml(spec))} | {env} "
                f"| {live} | {_cell(spec.doc)} |"
            )
    return "\n".join(out) + "\n"
