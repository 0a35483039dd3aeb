"""A running daemon, workers and all, has not loaded llama.cpp: only its worker processes
have. The import contract checks the code statically; this checks the process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_daemon_serving_with_process_workers_never_loads_llama_cpp(
    tiny_model: Path, short_dir: Path
) -> None:
    code = textwrap.dedent(
        f"""
        import asyncio, sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from conftest import make_config
        from sidecar.app import App
        from sidecar.domain.types import GenerateTask

        async def main():
            app = App(make_config(__import__("pathlib").Path({str(short_dir)!r}),
                                  __import__("pathlib").Path({str(tiny_model)!r}), workers=1))
            await app.start()
            try:
                result = await app.engine.run("", GenerateTask("hi", max_tokens=2), "test")
                assert result.usage.completion_tokens >= 1, result
                assert app.local.pools[app.config.default_model].workers()[0].info.pid
            finally:
                await app.stop(grace=0)
            sys.exit("llama_cpp loaded in the daemon" if "llama_cpp" in sys.modules else 0)

        asyncio.run(main())
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert run.returncode == 0, run.stderr[-2000:] or run.stdout[-2000:]
