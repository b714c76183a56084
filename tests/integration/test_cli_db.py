"""``caracal db``: health, migrations, the read-only query command, reset."""

from __future__ import annotations

import json
import threading
import uuid

import psycopg

from caracald.store.migrate import latest_version, migrate
from tests.clitools import block
from tests.harness.postgres import PostgresService
from tests.integration.conftest import Cli


def _count(url: str, table: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        assert row is not None
        return int(row[0])


def test_health_check_reports_a_healthy_store(cli: Cli) -> None:
    out = cli.ok("db", "health-check")
    fields = block(out.stdout)
    assert fields["Status"] == "healthy"
    assert fields["Mode"] == "external"
    assert fields["Schema Version"].startswith(str(latest_version()))
    assert fields["Read Replica"] == "not configured"
    data = json.loads(cli.ok("db", "health-check", "-o", "json").stdout)
    assert data["status"] == "healthy"
    assert data["latency_ms"] >= 0


def test_health_check_fails_cleanly_when_postgres_is_unreachable() -> None:
    result = Cli("postgresql://caracal@127.0.0.1:1/caracal?connect_timeout=1")("db", "health-check")
    assert result.exit_code == 3
    assert result.stderr.startswith("Error: cannot connect to PostgreSQL")
    assert "Connection refused" in result.stderr  # the reason, not just "timed out"
    assert result.stderr.count("\n") == 1


def test_migrations_are_idempotent_and_safe_in_parallel(postgres_service: PostgresService) -> None:
    name = f"m_{uuid.uuid4().hex[:12]}"
    postgres_service.create_database(name)
    url = postgres_service.admin_uri(name)
    try:
        errors: list[BaseException] = []
        applied: list[int] = []

        def run() -> None:
            try:
                applied.append(len(migrate(url).applied))
            except BaseException as exc:  # collected and asserted on below
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert sorted(applied) == [0, 0, 0, latest_version()]
        assert _count(url, "schema_migrations") == latest_version()
        out = Cli(url).ok("db", "migrate")
        assert f"version {latest_version()}" in out.stdout
    finally:
        postgres_service.drop_database(name)


def test_a_changed_migration_is_refused(cli: Cli, database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
    result = cli("db", "migrate")
    assert result.exit_code == 1
    assert "forward-only" in result.stderr


def test_query_reads(cli: Cli) -> None:
    cli.ok("agent", "create", "--name", "reader", "--owner", "o@example.com")
    out = cli.ok("db", "query", "SELECT name, status FROM agents")
    assert out.stdout.split() == ["NAME", "STATUS", "reader", "active"]
    data = json.loads(
        cli.ok("db", "query", "SELECT name FROM agents WHERE name LIKE 'read%'", "-o", "json").stdout
    )
    assert data == {"columns": ["name"], "rows": [["reader"]], "truncated": False}


def test_query_never_writes(cli: Cli, database_url: str) -> None:
    cli.ok("agent", "create", "--name", "keep-me", "--owner", "o@example.com")
    attempts = [
        "DELETE FROM agents",
        "UPDATE agents SET name = 'x'",
        "DROP TABLE agents",
        "SELECT 1; DROP TABLE agents",
        "COMMIT; DROP TABLE agents",
        "SELECT set_config('transaction_read_only', 'off', false)",
        "CREATE TABLE intruder (x int)",
    ]
    for statement in attempts:
        result = cli("db", "query", statement)
        assert result.exit_code == 2, (statement, result)
        assert result.stderr.startswith("Error: "), result
    assert _count(database_url, "agents") == 1


def test_query_limits_rows_and_time(cli: Cli) -> None:
    out = cli.ok("db", "query", "SELECT g FROM generate_series(1, 50) g", "--limit", "10")
    assert len(out.stdout.split()) == 11
    assert "truncated to 10 rows" in out.stderr
    slow = cli("db", "query", "SELECT pg_sleep(5)", "--timeout-ms", "200")
    assert slow.exit_code == 2
    assert "timeout" in slow.stderr


def test_query_errors_are_one_line(cli: Cli) -> None:
    result = cli("db", "query", "SELEC nothing")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "syntax error" in result.stderr


def test_reset_needs_confirmation_and_then_empties_everything(cli: Cli, database_url: str) -> None:
    cli.ok("agent", "create", "--name", "doomed", "--owner", "o@example.com")
    refused = cli("db", "reset")
    assert refused.exit_code == 1
    assert "--confirm" in refused.stderr
    assert _count(database_url, "agents") == 1
    out = cli.ok("db", "reset", "--confirm")
    assert "empty schema" in out.stdout
    assert _count(database_url, "agents") == 0
    assert _count(database_url, "schema_migrations") == latest_version()
    # the reset itself is the first record of the new audit trail
    records = json.loads(cli.ok("audit", "query", "-o", "json").stdout)
    assert [r["action"] for r in records] == ["db.reset"]
