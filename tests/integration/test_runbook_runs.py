"""Every ``caracal`` line of the runbook, run against real PostgreSQL, Redis and Kafka.

``tests/unit/test_runbook.py`` only checks that each command and its options exist; this runs them.
Read-only lines run as written. A line that changes things runs as written when it already says
``--dry-run``; ``--dry-run`` is added when the command has it (in place of ``--execute``); a few
commands that create harmless rows in this throw-away database run for real; the rest only show
``--help`` (see ``HELP_ONLY``). A line may fail only the way an operator can read: exit code 1 and one
line on stderr that starts with ``Error`` (an example id the database does not hold, a component that
is not running); never a usage error (exit code 2) or a traceback.
"""

from __future__ import annotations

import json
import os
import shlex
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

from caracal_ops.cli.main import app as caracal_app
from caracal_ops.procedures import backup as backups
from caracal_ops.procedures import snapshot as snapshots
from caracald.bus.kafka import create_topics
from caracald.cli import app as caracald_app
from caracald.core.ledger import LedgerEvent, LedgerEventType
from caracald.core.money import Money
from caracald.store import ledger as ledger_store
from caracald.store.database import Database
from tests.harness.kafka import KafkaService
from tests.harness.postgres import PostgresService
from tests.harness.redis_server import RedisService
from tests.unit.test_runbook import _split, command_lines

pytestmark = pytest.mark.integration

AGENT_ID = "550e8400-e29b-41d4-a716-446655440000"
BATCH_ID = uuid.UUID("880e8400-e29b-41d4-a716-446655440003")
SNAPSHOT_ID = uuid.UUID("990e8400-e29b-41d4-a716-446655440004")
BACKUP_IDS = {"postgresql": "postgresql-20240115T000000Z-3f2a", "kafka": "kafka-20240115T000000Z-7c1e"}

# Commands that change things, have no --dry-run, and are not harmless in a throw-away database:
# only their --help runs.
HELP_ONLY = {
    ("services", "down"),  # stops the platform's daemons
    ("services", "up"),  # starts them
    ("db", "reset"),  # drops every table (the other lines share this database)
    ("kafka", "create-topics"),  # a replication factor of 3 needs three brokers
}
# Commands that change things without --dry-run, run for real: new rows in the throw-away database,
# new files in the throw-away backup folder.
RUN_FOR_REAL = {
    ("agent", "create"),
    ("policy", "create"),
    ("allowlist", "create"),
    ("snapshot", "create"),
    ("backup", "create"),
}
# Commands that change things and have --dry-run: it is added when the line does not say it.
DRY_RUN = {
    ("snapshot", "restore"),
    ("dlq", "retry"),
    ("dlq", "purge"),
    ("backup", "prune"),
    ("backup", "restore"),
    ("replay", "start"),
    ("emergency", "stop-writes"),
    ("emergency", "preserve-evidence"),
    ("emergency", "restart-all"),
    ("emergency", "rotate-all"),
    ("db", "rotate-password"),
    ("kafka", "rotate-credentials"),
}


def _command(path: list[str]) -> tuple[str, ...]:
    return tuple(path[:2]) if len(path) >= 2 else tuple(path)


def runbook_args(line: str) -> tuple[str, list[str]]:
    """The program and the arguments this test runs for one runbook line."""
    program, path, _ = _split(line)
    args = shlex.split(line)[1:]
    command = _command(path)
    if "--help" in args or command in RUN_FOR_REAL:
        return program, args
    if command in HELP_ONLY:
        return program, [*path[:2], "--help"]
    if command in DRY_RUN and "--dry-run" not in args:
        return program, [*(a for a in args if a != "--execute"), "--dry-run"]
    return program, args


def _id(line: str) -> str:
    return " ".join(shlex.split(line)[:6])


LINES = command_lines()


def test_every_changing_command_is_classified() -> None:
    """A runbook command that has --dry-run but is not in DRY_RUN would run for real here."""
    runner = CliRunner()
    for line in LINES:
        program, path, _ = _split(line)
        if program != "caracal" or _command(path) in DRY_RUN | HELP_ONLY:
            continue
        result = runner.invoke(caracal_app, [*path, "--help"], env={"COLUMNS": "200"})
        assert "--dry-run" not in result.stdout, f"{line}: add {_command(path)} to DRY_RUN"


@dataclass
class Runbook:
    database_url: str
    env: dict[str, str]
    workdir: Path


@pytest.fixture(scope="module")
def runbook(
    postgres_service: PostgresService,
    migrated_template: str,
    kafka_service: KafkaService,
    redis_service: RedisService,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Runbook]:
    name = f"t_runbook_{uuid.uuid4().hex[:10]}"
    postgres_service.create_database(name, template=migrated_template)
    url = postgres_service.admin_uri(name)
    root = tmp_path_factory.mktemp("runbook")
    config = root / "caracal.yaml"
    config.write_text(
        "\n".join(
            [
                "platform:",
                "  kind: local",
                "kafka:",
                f"  bootstrap_servers: {json.dumps(kafka_service.bootstrap_servers)}",
                "redis:",
                f"  url: {json.dumps(redis_service.url)}",
                "bus:",
                "  kind: kafka",
                "integrity:",
                f"  key_dir: {json.dumps(str(root / 'keys'))}",
                "database:",
                f"  password_file: {json.dumps(str(root / 'db-password'))}",
                "backup:",
                f"  dir: {json.dumps(str(root / 'backups'))}",
                "embedded:",
                f"  data_dir: {json.dumps(str(root / 'data'))}",
            ]
        )
        + "\n"
    )
    (root / "db-password").write_text("unused\n")
    (root / "db-password").chmod(0o600)
    _seed(url)
    create_topics({"bootstrap.servers": kafka_service.bootstrap_servers}, partitions=1, replication_factor=1)
    env = {"CARACAL_CONFIG": str(config), "CARACAL_DATABASE_URL": url, "COLUMNS": "200"}
    runbook = Runbook(url, env, root)
    try:
        # a signing key, the seeded events sealed as the runbook's batch, the files `merkle verify-proof`
        # reads, the runbook's snapshot and backups
        _ok(runbook, "merkle", "generate-key")
        with _next_uuid(BATCH_ID):
            _ok(runbook, "merkle", "seal")
        _ok(runbook, "merkle", "prove", "--event-id", "12345", "--output", "proof.json")
        _ok(runbook, "merkle", "export-public-key", "--output", "ledger-key.pub")
        with _next_uuid(SNAPSHOT_ID), Database(url) as db:
            snapshots.create_snapshot(db, actor="ops@example.com", directory=root / "backups" / "snapshots")
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1 FROM merkle_batches WHERE batch_id = %s", (BATCH_ID,)).fetchone()
            assert conn.execute(
                "SELECT 1 FROM ledger_snapshots WHERE snapshot_id = %s", (SNAPSHOT_ID,)
            ).fetchone()
        for kind, backup_id in BACKUP_IDS.items():
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(backups, "new_backup_id", lambda *_, backup_id=backup_id: backup_id)
                _ok(runbook, "backup", "create", "--type", kind)
        # what the daemons would have logged
        (root / "data" / "logs").mkdir(parents=True, exist_ok=True)
        for component in ("gateway", "ledger-writer"):
            (root / "data" / "logs" / f"{component}.log").write_text(f"{component} started\n")
        yield runbook
    finally:
        postgres_service.drop_database(name)


def _seed(url: str) -> None:
    """The runbook's example agent, with January 2024 spend from ledger event 12345 on, and DLQ event 12345."""
    now = datetime.now(UTC)
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO agents (agent_id, name, owner, status, created_at, updated_at)"
            " VALUES (%s, 'runbook-agent', 'ops@example.com', 'active', %s, %s)",
            (AGENT_ID, now, now),
        )
        conn.execute("ALTER TABLE ledger_events ALTER COLUMN event_id RESTART WITH 12345")
        conn.execute("ALTER TABLE dlq_events ALTER COLUMN dlq_id RESTART WITH 12345")
        conn.execute(
            "INSERT INTO dlq_events (source_topic, source_partition, source_offset, consumer_group, payload,"
            " error_type, error_message, failed_at) VALUES ('caracal.metering.events', 0, 1,"
            " 'ledger-writer-group', '\\x00', 'PolicyEvaluationError', 'no policy', '2024-01-02T00:00:00Z')"
        )
    events = [
        LedgerEvent(
            uuid.uuid4(),
            LedgerEventType.SETTLEMENT,
            uuid.UUID(AGENT_ID),
            datetime(2024, 1, 15, tzinfo=UTC) + timedelta(hours=i),
            Money(Decimal("0.037"), "USD"),
            resource="https://api.openai.com/v1/chat/completions",
            model="gpt-4o",
        )
        for i in range(20)
    ]
    with Database(url) as db, db.transaction() as conn:
        assert ledger_store.insert_events(conn, events) == len(events)


@contextmanager
def _next_uuid(value: uuid.UUID) -> Iterator[None]:
    """The next ``uuid.uuid4()`` drawn is ``value`` (a runbook example id), the ones after it random."""
    real = uuid.uuid4
    ids = iter([value])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(uuid, "uuid4", lambda: next(ids, None) or real())
        yield


def _ok(runbook: Runbook, *args: str) -> None:
    result = _run(runbook, "caracal", list(args))
    assert result.exit_code == 0, (args, result.output)


def _run(runbook: Runbook, program: str, args: list[str]) -> Any:
    app = caracal_app if program == "caracal" else caracald_app
    runner = CliRunner()
    cwd = os.getcwd()
    os.chdir(runbook.workdir)
    try:
        return runner.invoke(app, args, env=runbook.env, catch_exceptions=True)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("line", LINES, ids=[f"{n:02d} {_id(line)}" for n, line in enumerate(LINES)])
def test_runbook_line_runs(runbook: Runbook, line: str) -> None:
    program, args = runbook_args(line)
    result = _run(runbook, program, args)
    shown = f"{line}\n  ran: {program} {shlex.join(args)}\n  exit {result.exit_code}\n  stdout: {result.stdout}\n  stderr: {result.stderr}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        shown + f"\n  exception: {result.exception!r}"
    )
    assert "Traceback" not in result.stdout + result.stderr, shown
    assert result.exit_code in (0, 1), shown
    if result.exit_code == 1:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error"), shown
