"""The shipped Grafana dashboard is importable as it is: a dashboard model with a schema
version, a data source variable every panel uses, and a PromQL query per target."""

from __future__ import annotations

import json
from typing import Any

from promql import DASHBOARD, dashboard_queries

DS = {"type": "prometheus", "uid": "${datasource}"}


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_the_dashboard_is_an_importable_model_with_a_data_source_variable() -> None:
    d = load()
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert d["title"] and d["uid"] and "id" not in d  # no id: import creates a new one
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in ("instance", "model"):
        assert variables[name]["datasource"] == DS


def test_every_panel_queries_the_chosen_data_source_and_fits_the_grid() -> None:
    panels = load()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == DS, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS and t["expr"].strip(), p["title"]


def test_the_dashboard_shows_what_an_operator_watches() -> None:
    queried = {s.name for q in dashboard_queries() for s in q.selectors}
    for name in (
        "sidecar_model_serving",
        "sidecar_worker_restarts_total",
        "sidecar_queue_depth",
        "sidecar_shedding",
        "sidecar_request_seconds_bucket",
        "sidecar_prompt_tokens_total",
        "sidecar_completion_tokens_total",
        "sidecar_escalations_total",
        "sidecar_routed_total",
        "sidecar_cloud_budget_spent",
        "sidecar_cloud_budget_cap",
        "sidecar_updates_total",
        "sidecar_update_rejections_total",
        "sidecar_swaps_total",
    ):
        assert name in queried, name
