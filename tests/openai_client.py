"""The openai SDK pointed at the daemon's HTTP API on a Unix socket (shared by tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai


def unix_client(path: Path, **kw: Any) -> openai.AsyncOpenAI:
    transport = httpx.AsyncHTTPTransport(uds=str(path))
    return openai.AsyncOpenAI(
        api_key=kw.pop("api_key", "unused"),
        base_url="http://sidecar/v1",
        http_client=httpx.AsyncClient(transport=transport),
        max_retries=0,
        **kw,
    )
