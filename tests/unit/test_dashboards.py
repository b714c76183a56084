"""The Grafana dashboards of deploy/grafana, and the metric names deploy/ references."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploytools import (
    DASHBOARDS,
    DEPLOY,
    dashboard_expressions,
    is_standard_metric,
    metric_family,
    metric_names,
    metric_references,
    recorded_names,
    referenced_metrics,
    rule_expressions,
)

GRAFANA = DEPLOY / "grafana"

#: The runbook's five dashboards ("Monitoring and Alerts"): uid -> the runbook's name, in the title.
RUNBOOK_DASHBOARDS = {
    "caracal-overview": "Caracal Overview",
    "caracal-gateway": "Gateway Performance",
    "caracal-kafka-consumers": "Kafka Consumers",
    "caracal-merkle": "Merkle Tree Operations",
    "caracal-database": "Database Performance",
}

#: The runbook's "Key Metrics to Monitor": each must appear on some dashboard.
RUNBOOK_METRICS = {
    "caracal_gateway_requests_total",
    "caracal_gateway_request_duration_seconds",
    "caracal_policy_evaluations_total",
    "caracal_gateway_auth_failures_total",
    "caracal_kafka_consumer_lag",
    "caracal_kafka_message_processing_duration_seconds",
    "caracal_kafka_consumer_errors_total",
    "caracal_merkle_batches_created_total",
    "caracal_merkle_verification_failures_total",
    "caracal_merkle_batch_processing_duration_seconds",
    "caracal_database_queries_total",
    "caracal_database_query_duration_seconds",
    "caracal_database_connection_pool_size",
    "caracal_dlq_size",
    "caracal_dlq_oldest_message_age_seconds",
}


def _load(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def _dashboards() -> dict[str, dict[str, Any]]:
    return {path.stem: _load(path) for path in sorted(DASHBOARDS.glob("*.json"))}


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in panels:
        out.append(panel)
        out.extend(_panels(panel.get("panels", [])))
    return out


def test_the_five_dashboards_with_fixed_uids_and_the_runbooks_titles() -> None:
    boards = _dashboards()
    assert set(boards) == set(RUNBOOK_DASHBOARDS), "one file per dashboard, named after its uid"
    for uid, name in RUNBOOK_DASHBOARDS.items():
        board = boards[uid]
        assert board["uid"] == uid
        assert name in board["title"], (uid, board["title"])
        assert board["title"].startswith("Caracal")
        assert "caracal" in board["tags"]
        assert board.get("id") is None, "provisioned dashboards carry no database id"
    titles = [board["title"] for board in boards.values()]
    assert len(set(titles)) == len(titles)


@pytest.mark.parametrize("uid", sorted(RUNBOOK_DASHBOARDS))
def test_dashboard_structure(uid: str) -> None:
    board = _load(DASHBOARDS / f"{uid}.json")
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = _panels(board["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 4
    for panel in graphs:
        assert panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"] == panel["datasource"]
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, (panel["title"], pos)
        assert pos["h"] >= 1
    # Template variables used by queries are defined.
    for panel in graphs:
        for target in panel["targets"]:
            for name in ("instance", "group"):
                if f"${name}" in target["expr"]:
                    assert name in variables, (panel["title"], name)


def test_provisioning_files() -> None:
    dashboards = yaml.safe_load((GRAFANA / "provisioning" / "dashboards.yml").read_text())
    assert dashboards["apiVersion"] == 1
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")
    assert provider["disableDeletion"] is True
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources.yml").read_text())
    assert datasources["apiVersion"] == 1
    (prometheus,) = datasources["datasources"]
    assert prometheus["type"] == "prometheus"
    # The dashboards' datasource variable defaults to the provisioned data source.
    for board in _dashboards().values():
        variable = next(v for v in board["templating"]["list"] if v["name"] == "datasource")
        assert variable["current"]["value"] == prometheus["uid"]


def test_the_grafana_kustomization_ships_every_dashboard() -> None:
    kustomization = yaml.safe_load((GRAFANA / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    assert sorted(generator["files"]) == sorted(f"dashboards/{p.name}" for p in DASHBOARDS.glob("*.json"))
    assert kustomization["generatorOptions"]["labels"]["grafana_dashboard"] == "1"


def test_metric_name_extraction() -> None:
    assert metric_names(
        'sum by (group, topic) (max by (group, topic, partition) (caracal_kafka_consumer_lag{group=~"$group"}))'
        " > 10000"
    ) == {"caracal_kafka_consumer_lag"}
    assert metric_names(
        "histogram_quantile(0.95, sum by (le) (rate(caracal_x_seconds_bucket"
        '{instance=~"$instance", job="a"}[$__rate_interval])))'
    ) == {"caracal_x_seconds_bucket"}
    assert metric_names(
        'process_resident_memory_bytes{job=~"caracal-.*"} / on (job) group_left caracal:memory_limit_bytes > 0.8'
    ) == {"process_resident_memory_bytes", "caracal:memory_limit_bytes"}
    assert metric_names(
        "increase(a_total[15m]) > 0 or (a_total > 0 unless a_total offset 15m) and bool up == 1e3"
    ) == {"a_total", "up"}
    assert metric_names('count(b) by (x) + label_replace(vector(1), "job", "c", "", "")') == {"b"}
    assert metric_family("caracal_x_seconds_bucket") == "caracal_x_seconds"
    assert metric_family("caracal_requests_total") == "caracal_requests_total"


def test_every_dashboard_and_rule_expression_is_collected() -> None:
    dashboard_sources = {e.source.split(":")[0] for e in dashboard_expressions()}
    assert dashboard_sources == {f"deploy/grafana/dashboards/{uid}.json" for uid in RUNBOOK_DASHBOARDS}
    rules = list(rule_expressions())
    assert any("CaracalKafkaConsumerLagHigh" in e.source for e in rules)
    assert "caracal:memory_limit_bytes" in recorded_names()


def test_referenced_metrics_are_caracals_or_standard() -> None:
    names = referenced_metrics()
    assert names, "no metric found in deploy/"
    assert not any(name.startswith("caracal:") for name in names), "recorded series are not exported metrics"
    odd = {
        name: sorted(places)
        for name, places in metric_references().items()
        if not (name.startswith("caracal_") or is_standard_metric(name))
    }
    assert not odd, f"metrics that are neither caracal_* nor standard process/python ones: {odd}"


def test_the_runbooks_key_metrics_are_on_the_dashboards() -> None:
    on_dashboards = {
        metric_family(name)
        for expression in dashboard_expressions()
        for name in metric_names(expression.expr)
    }
    missing = RUNBOOK_METRICS - on_dashboards
    assert not missing, f"runbook metrics on no dashboard: {sorted(missing)}"
