"""``caracal status`` against real PostgreSQL, Redis, Kafka and a real gateway; exit 1 when one is down."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from caracal_ops.platform import platform_for
from caracal_ops.procedures import status
from caracald.runtime.config import load_config
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


def test_without_replica_urls_the_gateway_of_this_configuration_is_asked(
    tmp_path: Path, database_url: str, gateway: GatewayHarness
) -> None:
    port = gateway.url.rsplit(":", 1)[1]
    cli = _cli(tmp_path, database_url, ["gateway:", "  host: 127.0.0.1", f"  port: {port}"])
    found = _by_name(cli.ok("status", "--format", "json").stdout)
    assert found["gateway"]["status"] == "ok"
    assert found["gateway"]["url"] == gateway.url and found["gateway"]["health"] == "ok"


def test_no_gateway_running_here_is_a_warning_that_says_how_to_start_one(
    tmp_path: Path, database_url: str
) -> None:
    port = free_port()
    cli = _cli(tmp_path, database_url, ["gateway:", "  host: 0.0.0.0", f"  port: {port}"])
    result = cli.ok("status", "--format", "json")  # a warning, not a failure: exit 0
    found = _by_name(result.stdout)
    assert found["gateway"]["status"] == "warning"
    assert f"none answering at http://127.0.0.1:{port}" in found["gateway"]["detail"]
    assert "caracald gateway" in found["gateway"]["detail"]


def test_on_the_embedded_default_stopped_daemons_are_not_a_warning(tmp_path: Path) -> None:
    """``caracald up`` runs the gateway and the consumers in one process: the local supervisor having
    started none of them is how the embedded default runs, not a problem."""
    config = load_config(None, overrides={("embedded", "data_dir"): tmp_path / "data"}, environ={})
    assert config.embedded_mode
    checks = {c.component: c for c in status.check_daemons(platform_for(config), embedded=True)}
    assert checks and all(c.status == status.SKIPPED for c in checks.values())
    assert "inside `caracald up`" in checks["daemon ledger-writer"].detail
    distributed = {c.component: c for c in status.check_daemons(platform_for(config), embedded=False)}
    assert distributed["daemon ledger-writer"].status == status.WARNING
