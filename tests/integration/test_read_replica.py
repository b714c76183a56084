"""Read-only queries go to the read replica when one is configured."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict
from typer.testing import CliRunner

from caracal_ops.cli.main import app
from caracald.core.ledger import LedgerEvent, LedgerEventType
from caracald.core.money import Money
from caracald.store import ledger as ledger_store
from caracald.store.database import Database
from tests.harness.postgres import PostgresService
from tests.integration.conftest import Cli


def test_ledger_query_reads_from_the_replica(
    cli: Cli, database_url: str, postgres_service: PostgresService, tmp_path: Path
) -> None:
    agent = json.loads(
        cli.ok("agent", "create", "--name", "r", "--owner", "o@example.com", "-o", "json").stdout
    )
    agent_id = uuid.UUID(agent["agent_id"])
    at = datetime(2024, 5, 1, tzinfo=UTC)

    def charge(url: str, amount: str) -> None:
        with Database(url) as db, db.transaction() as conn:
            ledger_store.insert_events(
                conn,
                [
                    LedgerEvent(
                        uuid.uuid4(), LedgerEventType.SETTLEMENT, agent_id, at, Money(Decimal(amount), "USD")
                    )
                ],
            )

    charge(database_url, "1")
    # the "replica": a copy taken now, which then lags behind the primary
    replica = f"r_{uuid.uuid4().hex[:12]}"
    postgres_service.create_database(replica, template=str(conninfo_to_dict(database_url)["dbname"]))
    try:
        charge(database_url, "10")
        config = tmp_path / "caracal.yaml"
        config.write_text(
            f"database:\n  url: '{database_url}'\n  read_replica_url: '{postgres_service.admin_uri(replica)}'\n"
        )
        result = CliRunner().invoke(
            app,
            [
                "--config",
                str(config),
                "ledger",
                "query",
                "--agent-id",
                str(agent_id),
                "--start-time",
                "2024-05-01",
                "-o",
                "json",
            ],
        )
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)[0]["total_spending"] == "1.00"
        assert (
            json.loads(
                cli.ok(
                    "ledger", "query", "--agent-id", str(agent_id), "--start-time", "2024-05-01", "-o", "json"
                ).stdout
            )[0]["total_spending"]
            == "11.00"
        )
        health = CliRunner().invoke(app, ["--config", str(config), "db", "health-check", "-o", "json"])
        assert json.loads(health.stdout)["read_replica"] == "healthy"
    finally:
        postgres_service.drop_database(replica)
