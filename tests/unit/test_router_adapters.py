"""The router keeps a request with a LoRA adapter on this machine: the request's own
adapter, or the one its config task answers with (a cloud model would answer without it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import CloudConfig
from sidecar.domain.errors import FailedPrecondition
from sidecar.domain.types import ClassifyTask, GenerateTask, RouteRequest, Task
from sidecar.router.breaker import Breaker
from sidecar.router.budget import Budget, Prices
from sidecar.router.engine import NoTasks, RouterEngine
from sidecar.router.outbound import Gate
from sidecar.router.privacy import Scanner

pytestmark = pytest.mark.asyncio


class AdaptedTask(NoTasks):
    def adapter(self, task: str) -> str:
        return "fmt" if task == "t" else ""


def router(tmp_path: Path) -> RouterEngine:
    return RouterEngine(object(), CloudConfig(), breaker=Breaker(3, 60),  # type: ignore[arg-type]
                        budget=Budget(tmp_path / "b.json", Prices(0, 0)),
                        gate=Gate(Scanner(), False), cloud=None, tasks=AdaptedTask())  # fmt: skip


@pytest.mark.parametrize(
    ("task", "local"),
    [
        (GenerateTask("hi", 1, adapter="fmt"), True),
        (ClassifyTask("hi", ("a", "b"), task="t"), True),  # its config task's adapter
        (ClassifyTask("hi", ("a", "b"), task="other"), False),
        (GenerateTask("hi", 1), False),
    ],
)
async def test_an_adapter_request_stays_local_and_cloud_only_is_refused(
    tmp_path: Path, task: Task, local: bool
) -> None:
    r = router(tmp_path)
    situation, _ = await r._situation(task, RouteRequest("AUTO"))
    assert (situation.routing == "LOCAL_ONLY") is local
    if local:
        with pytest.raises(FailedPrecondition, match="runs only on this machine"):
            await r._situation(task, RouteRequest("CLOUD_ONLY"))
