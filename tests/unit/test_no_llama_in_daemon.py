"""The daemon process never imports llama.cpp (1.2 s of import, and native code it never
runs): only worker processes do. Every module of the package is imported in a fresh
interpreter, except the ones listed here, which run only inside a worker process."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import sidecar

WORKER_ONLY = {
    "sidecar.worker.runner": "LlamaRunner: the one llama_cpp.Llama a worker owns",
    "sidecar.worker.process": "worker_main, the entry point of a spawned worker",
    "sidecar.worker.native_log": "routes llama.cpp's log inside a worker (llama_log_set)",
    "sidecar.worker.batch": "BatchDecoder: the runner's llama.cpp context and decode steps",
    "sidecar.worker.sequence": "one generation in the batch (llama.cpp sampler, vocab)",
    "sidecar.worker.embed": "BatchEmbedder: the embedding context of a worker",
    "sidecar.worker.label_batch": "LlamaTrieDecoder: Classify's labels decoded on the worker's context",
    "sidecar.worker.cells": "CellLedger: the batch context's KV cells (llama_memory calls)",
    "sidecar.worker.lora": "LoraCache: a worker's loaded LoRA adapters (llama_adapter_lora_*)",
}
# Importing these runs a program instead of defining one.
ENTRY_POINTS = {"sidecar.cli.__main__"}


def daemon_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(sidecar.__path__, "sidecar.")]
    return sorted(n for n in names if n not in WORKER_ONLY and n not in ENTRY_POINTS)


def test_the_worker_only_list_names_real_modules() -> None:
    names = {m.name for m in pkgutil.walk_packages(sidecar.__path__, "sidecar.")}
    assert set(WORKER_ONLY) <= names


def test_importing_every_daemon_module_loads_no_llama_cpp() -> None:
    modules = daemon_modules()
    assert "sidecar.engine.local" in modules and "sidecar.supervisor" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "    if 'llama_cpp' in sys.modules:\n"
        "        sys.exit('llama_cpp was loaded by importing ' + name)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr or run.stdout


def test_the_check_itself_would_see_llama_cpp() -> None:
    code = "import sys, sidecar.worker.runner; sys.exit('llama_cpp' not in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
