"""``caracal status`` against real PostgreSQL, Redis, Kafka and a real gateway; exit 1 when one is down."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from caracald.store.database import Database
from tests.e2e.gateway_harness import GatewayHarness
from tests.harness.ports import free_port
from tests.integration.conftest import Cli

pytestmark = pytest.mark.integration


@pytest.fixture
def gateway(database_url: str) -> Iterator[GatewayHarness]:
    with GatewayHarness(database_url) as gw:
        yield gw


def _cli(tmp_path: Path, database_url: str, lines: list[str]) -> Cli:
    config = tmp_path / "caracal.yaml"
    config.write_text(
        "\n".join([*lines, "embedded:", f"  data_dir: {json.dumps(str(tmp_path / 'data'))}"]) + "\n"
    )
    return Cli(database_url, env={"CARACAL_CONFIG": str(config)})


def _by_name(out: str) -> dict[str, dict[str, Any]]:
    return {c["component"]: c for c in json.loads(out)["components"]}


def test_everything_up(
    tmp_path: Path,
    database_url: str,
    gateway: GatewayHarness,
    redis_service: Any,
    kafka_service: Any,
    db: Database,
) -> None:
    cli = _cli(
        tmp_path,
        database_url,
        [
            "platform:",
            f"  gateway_urls: [{json.dumps(gateway.url)}]",
            "redis:",
            f"  url: {json.dumps(redis_service.url)}",
            "kafka:",
            f"  bootstrap_servers: {json.dumps(kafka_service.bootstrap_servers)}",
        ],
    )
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO dlq_events (source_topic, source_partition, source_offset, consumer_group, payload,"
            " error_type, error_message, failed_at) VALUES ('t', 0, 1, 'g', '\\x00', 'E', 'boom', now())"
        )
    out = cli.ok("status", "--format", "json")
    data = json.loads(out.stdout)
    found = _by_name(out.stdout)
    assert found["postgresql"]["status"] == "ok"
    assert found["redis"]["status"] == "ok"
    assert found["kafka"]["status"] == "ok" and found["kafka"]["brokers"] >= 1
    assert found[f"gateway {gateway.url}"]["status"] == "ok"
    assert found["dlq"]["status"] == "warning" and found["dlq"]["pending"] == 1
    assert found["merkle"]["status"] == "ok" and "no batch" in found["merkle"]["detail"]
    for group in ("ledger-writer-group", "metrics-aggregator-group", "audit-logger-group"):
        assert f"consumer {group}" in found
    assert data["status"] in ("ok", "warning")

    table = cli.ok("status")
    assert "POSTGRESQL" not in table.stdout and "postgresql" in table.stdout and "Overall:" in table.stdout


def test_a_component_down_exits_1(tmp_path: Path, database_url: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    cli = _cli(
        tmp_path,
        database_url,
        [
            "platform:",
            f"  gateway_urls: [{json.dumps(dead)}]",
            "redis:",
            f"  url: redis://127.0.0.1:{free_port()}/0",
        ],
    )
    result = cli("status", "--format", "json")
    assert result.exit_code == 1
    found = _by_name(result.stdout)
    assert json.loads(result.stdout)["status"] == "down"
    assert found[f"gateway {dead}"]["status"] == "down"
    assert found["redis"]["status"] == "down"
    assert found["postgresql"]["status"] == "ok"
    assert found["kafka"]["status"] == "skipped"
