"""``caracal backup`` against real PostgreSQL and Kafka: create, list, verify, restore, prune."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from psycopg.rows import dict_row

from caracald.store.migrate import available_migrations, migrate
from tests.clitools import block
from tests.harness.kafka import KafkaService
from tests.harness.postgres import PostgresService
from tests.integration.conftest import Cli

pytestmark = pytest.mark.integration


def _cli(database_url: str, tmp_path: Path, **env: str) -> Cli:
    return Cli(
        database_url,
        env={
            "CARACAL__BACKUP__DIR": str(tmp_path / "backups"),
            "CARACAL_DATA_DIR": str(tmp_path / "data"),
            **env,
        },
    )


def _rows(database_url: str, query: str, *params: object) -> list[dict[str, Any]]:
    # a fresh connection: the restore replaces every table under the pool's feet
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        return conn.execute(query, params).fetchall()


def _agent(cli: Cli, name: str) -> str:
    agent_id = block(cli.ok("agent", "create", "--name", name, "--owner", "ops@example.com").stdout)[
        "Agent ID"
    ]
    cli.ok(
        "policy", "create", "--agent-id", agent_id, "--limit", "125.50", "--currency", "USD",
        "--time-window", "daily", "--window-type", "calendar", "--change-reason", "initial budget",
    )  # fmt: skip
    return agent_id


def _state(cli: Cli, agent_ids: list[str]) -> dict[str, Any]:
    return {
        "agents": json.loads(cli.ok("agent", "list", "-o", "json").stdout),
        "policies": {
            a: json.loads(cli.ok("policy", "list", "--agent-id", a, "-o", "json").stdout) for a in agent_ids
        },
    }


def _create(cli: Cli, *args: str) -> dict[str, Any]:
    created: dict[str, Any] = json.loads(cli.ok("backup", "create", *args, "-o", "json").stdout)
    return created


def _error_line(result: Any) -> str:
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), result
    return str(lines[-1])


# -- PostgreSQL ---------------------------------------------------------------------------------------


def test_postgresql_backup_verify_restore(database_url: str, tmp_path: Path) -> None:
    cli = _cli(database_url, tmp_path)
    agents = [_agent(cli, "alpha"), _agent(cli, "beta")]
    cli.ok("allowlist", "create", "--agent-id", agents[0], "--pattern", "https://api.openai.com/*")
    before = _state(cli, agents)

    created = _create(cli, "--type", "postgresql", "--tag", "before-reset")
    backup_id = created["backup_id"]
    assert backup_id.startswith("postgresql-")
    assert created["status"] == "complete"
    assert created["tag"] == "before-reset"
    assert created["created_by"] == "tester@example.com"
    assert created["postgresql"]["schema_version"] >= 1
    assert "public.agents" in created["postgresql"]["tables"]
    dump = Path(created["path"]) / "database.dump"
    assert dump.stat().st_mode & 0o077 == 0  # private: it holds credential hashes
    assert [f["name"] for f in created["files"]] == ["database.dump"]
    assert created["files"][0]["size"] == dump.stat().st_size
    manifest = json.loads((Path(created["path"]) / "manifest.json").read_text())
    assert manifest["postgresql"]["server_version"]
    assert manifest["files"][0]["sha256"] == created["files"][0]["sha256"]

    table = cli.ok("backup", "list").stdout.splitlines()
    assert table[0].split() == ["BACKUP", "ID", "TYPE", "TAG", "CREATED", "SIZE", "STATUS"]
    assert table[1].split()[:3] == [backup_id, "postgresql", "before-reset"]
    assert table[1].split()[-1] == "complete"

    verified = cli.ok("backup", "verify", "--backup-id", backup_id)
    assert block(verified.stdout)["Status"] == "verified"
    assert "SHA-256 matches the manifest" in verified.stderr

    # the plan of a restore, without --execute: nothing happens
    dry = cli.ok("backup", "restore", "--backup-id", backup_id)
    assert dry.stdout.startswith(f"Plan: Restore PostgreSQL backup {backup_id}")
    assert "[destructive]" in dry.stdout
    assert "Dry run: nothing was changed. Add --execute to do it." in dry.stdout

    # everything is lost
    cli.ok("db", "reset", "--confirm")
    assert json.loads(cli.ok("agent", "list", "-o", "json").stdout) == []

    # the typed confirmation is the database's name
    dbname = database_url.split("?")[0].rsplit("/", 1)[1]
    refused = cli("backup", "restore", "--backup-id", backup_id, "--execute", input="caracal-prod\n")
    assert refused.exit_code == 1
    assert f"Type '{dbname}' to proceed" in refused.stderr
    assert (
        f"Error: confirmation 'caracal-prod' does not match '{dbname}': nothing was changed" in refused.stderr
    )
    assert json.loads(cli.ok("agent", "list", "-o", "json").stdout) == []

    restored = cli.ok(
        "backup", "restore", "--backup-id", backup_id, "--execute", "--yes", actor="restorer@example.com"
    )
    assert f"Backup {backup_id} restored." in restored.stdout
    print(restored.stderr)
    for step in ("SHA-256 checksum", "Stop gateway, ledger-writer", "Back up the database as it is now",
                 "pg_restore --clean --if-exists", "health-check", "Start again"):  # fmt: skip
        assert step in restored.stderr, restored
    assert _state(cli, agents) == before

    # the procedure is in the (restored, still intact) audit log
    actions = [
        (r["action"], r["actor"])
        for r in _rows(
            database_url,
            "SELECT action, actor FROM audit_log WHERE event_type = 'ops_procedure' ORDER BY audit_id",
        )
    ]
    assert ("backup.restore.started", "restorer@example.com") in actions
    assert actions[-1] == ("backup.restore.finished", "restorer@example.com")
    finished = _rows(database_url, "SELECT details FROM audit_log WHERE action = 'backup.restore.finished'")[
        0
    ]["details"]
    assert finished["params"]["backup_id"] == backup_id
    assert [s["status"] for s in finished["step_reports"]] == ["done"] * len(finished["step_reports"])
    safety = finished["result"]["safety_backup"]
    assert cli("audit", "verify").exit_code == 0

    # the database as it was before the restore (empty) was kept
    listed = {b["backup_id"]: b for b in json.loads(cli.ok("backup", "list", "-o", "json").stdout)}
    assert set(listed) == {backup_id, safety}
    assert listed[safety]["tag"] == f"pre-restore:{backup_id}"

    # one flipped byte: verify names the checksum and exits 1; the restore refuses the backup
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0x01
    dump.write_bytes(bytes(data))
    broken = cli("backup", "verify", "--backup-id", backup_id)
    assert broken.exit_code == 1
    message = _error_line(broken)
    assert "database.dump: SHA-256 checksum mismatch" in message
    assert "the backup is corrupt" in message
    listed = {b["backup_id"]: b for b in json.loads(cli.ok("backup", "list", "-o", "json").stdout)}
    assert listed[backup_id]["status"] == "verify-failed"
    refused = cli("backup", "restore", "--backup-id", backup_id, "--execute", "--yes")
    assert refused.exit_code == 1
    assert "failed at step 1 of" in _error_line(refused)
    assert "SHA-256 checksum mismatch" in _error_line(refused)
    assert _state(cli, agents) == before
    failed = _rows(database_url, "SELECT details FROM audit_log WHERE action = 'backup.restore.failed'")
    assert failed and failed[-1]["details"]["failed_step"] == "verify"


def test_restore_into_the_database_after_more_changes(database_url: str, tmp_path: Path) -> None:
    """Rows added after the backup go; rows deleted after it come back, ids and all."""
    cli = _cli(database_url, tmp_path)
    kept = _agent(cli, "kept")
    before = _state(cli, [kept])
    backup_id = _create(cli, "--type", "postgresql")["backup_id"]
    cli.ok("agent", "suspend", "--agent-id", kept, "--reason", "incident") if _has_suspend(cli) else None
    _agent(cli, "added-later")
    cli.ok("backup", "restore", "--backup-id", backup_id, "--execute", "--yes", "--no-safety-backup")
    assert _state(cli, [kept]) == before
    assert [b["backup_id"] for b in json.loads(cli.ok("backup", "list", "-o", "json").stdout)] == [backup_id]


def _has_suspend(cli: Cli) -> bool:
    return "suspend" in cli("agent", "--help").stdout


def test_prune_removes_only_old_backups(database_url: str, tmp_path: Path) -> None:
    cli = _cli(database_url, tmp_path)
    ids = [_create(cli, "--type", "postgresql", "--tag", f"b{i}")["backup_id"] for i in range(3)]
    root = tmp_path / "backups"
    now = datetime.now(UTC)
    ages = {ids[0]: 45, ids[1]: 31, ids[2]: 2}
    for backup_id, days in ages.items():
        path = root / backup_id / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["created_at"] = (now - timedelta(days=days)).isoformat()
        path.write_text(json.dumps(manifest))
    # the leftover of a crashed run, old too
    leftover = root / ".postgresql-20200101T000000Z-dead.partial"
    leftover.mkdir()
    (leftover / "database.dump").write_bytes(b"partial")
    old = (now - timedelta(days=60)).timestamp()
    os.utime(leftover, (old, old))

    dry = cli.ok("backup", "prune", "--keep-days", "30")
    assert f"Delete {ids[0]}" in dry.stdout and f"Delete {ids[1]}" in dry.stdout
    assert "Delete postgresql-20200101T000000Z-dead (incomplete" in dry.stdout
    assert ids[2] not in dry.stdout
    assert "Dry run: nothing was changed" in dry.stdout
    assert len(json.loads(cli.ok("backup", "list", "-o", "json").stdout)) == 4

    pruned = cli.ok("backup", "prune", "--keep-days", "30", "--execute", "--yes")
    assert "Deleted 3 backup(s)." in pruned.stdout
    assert [b["backup_id"] for b in json.loads(cli.ok("backup", "list", "-o", "json").stdout)] == [ids[2]]
    assert not leftover.exists()
    audited = _rows(database_url, "SELECT details FROM audit_log WHERE action = 'backup.prune.finished'")
    assert sorted(audited[0]["details"]["result"]["deleted"]) == sorted(
        [ids[0], ids[1], "postgresql-20200101T000000Z-dead"]
    )

    # the newest complete backup stays whatever its age
    path = root / ids[2] / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["created_at"] = (now - timedelta(days=90)).isoformat()
    path.write_text(json.dumps(manifest))
    kept = cli.ok("backup", "prune", "--keep-days", "30", "--execute", "--yes")
    assert f"{ids[2]} is older but kept" in kept.stdout
    assert "Nothing to do." in kept.stdout
    assert (root / ids[2]).exists()


def test_backup_errors(database_url: str, tmp_path: Path) -> None:
    cli = _cli(database_url, tmp_path)
    missing = cli("backup", "verify", "--backup-id", "postgresql-20240101T000000Z-0000")
    assert missing.exit_code == 1
    assert "not found" in _error_line(missing)
    bad_type = cli("backup", "create", "--type", "mysql")
    assert bad_type.exit_code == 2
    topic_for_pg = cli("backup", "create", "--type", "postgresql", "--topic", "x")
    assert topic_for_pg.exit_code == 2
    assert "--topic only applies to --type kafka" in _error_line(topic_for_pg)
    assert "No backups in" in cli.ok("backup", "list").stdout
    no_kafka = cli("backup", "create", "--type", "kafka")
    assert no_kafka.exit_code == 2
    assert "no Kafka configured" in _error_line(no_kafka)
    assert list((tmp_path / "backups").glob("*")) == []


# -- Kafka --------------------------------------------------------------------------------------------


def _consume_all(
    bootstrap: str, topic: str, partitions: int
) -> list[tuple[bytes | None, bytes | None, tuple[Any, ...], int]]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"check-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )
    ends = {}
    for p in range(partitions):
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        ends[p] = (low, high)
    consumer.assign(
        [TopicPartition(topic, p, ends[p][0]) for p in range(partitions) if ends[p][1] > ends[p][0]]
    )
    wanted = sum(high - low for low, high in ends.values())
    found: list[tuple[bytes | None, bytes | None, tuple[Any, ...], int]] = []
    deadline = datetime.now(UTC) + timedelta(seconds=30)
    while len(found) < wanted and datetime.now(UTC) < deadline:
        for message in consumer.consume(500, timeout=1.0):
            if message.error() is None:
                found.append(
                    (message.key(), message.value(), tuple(message.headers() or ()), message.partition())
                )
    consumer.close()
    assert len(found) == wanted
    return found


def test_kafka_backup_verify_and_restore_into_an_emptied_topic(
    database_url: str, tmp_path: Path, kafka_service: KafkaService
) -> None:
    bootstrap = kafka_service.bootstrap_servers
    cli = _cli(database_url, tmp_path, CARACAL_KAFKA_BOOTSTRAP_SERVERS=bootstrap)
    topic = f"caracal.metering.events.t{uuid.uuid4().hex[:8]}"
    kafka_service.create_topic(topic, num_partitions=3)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    sent = []
    # recent timestamps: the topic's 7-day retention deletes older records at once (the restore's
    # --new-timestamps exists for them)
    base = int(time.time() * 1000) - 60_000
    for i in range(60):
        key = None if i % 10 == 0 else f"agent-{i % 7}".encode()
        value = None if i == 13 else json.dumps({"n": i, "cost": "0.0125"}).encode() + bytes([0, 255, i])
        headers = [("event-type", b"reservation"), ("schema", str(i % 2).encode())]
        if i % 5 == 0:
            headers.append(("empty", None))
        producer.produce(topic, key=key, value=value, headers=headers, partition=i % 3, timestamp=base + i)
        sent.append((key, value, tuple(headers), i % 3))
    assert producer.flush(30) == 0
    original = _consume_all(bootstrap, topic, 3)
    assert Counter(original) == Counter(sent)

    created = _create(cli, "--type", "kafka", "--topic", topic, "--tag", "evidence")
    backup_id = created["backup_id"]
    (exported,) = created["kafka"]["topics"]
    assert exported["records"] == 60, created
    assert sorted((p["partition"], p["records"]) for p in exported["partitions"]) == [
        (0, 20),
        (1, 20),
        (2, 20),
    ]
    lines = (Path(created["path"]) / f"{topic}.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert set(first) == {"partition", "offset", "timestamp", "timestamp_type", "key", "value", "headers"}
    assert first["timestamp_type"] == "create"
    # no consumer group was created or moved by the backup
    groups = [g.group_id for g in kafka_service.admin().list_consumer_groups().result(timeout=10).valid]
    assert not any(g.startswith("caracal-backup-") for g in groups)

    verified = cli.ok("backup", "verify", "--backup-id", backup_id)
    assert block(verified.stdout)["Status"] == "verified"
    assert "60 records read; the count of every partition matches the manifest" in verified.stderr

    # empty the topic (the offsets go on from where they were)
    admin = kafka_service.admin()
    marks = {
        p: hi
        for p, (_lo, hi) in (
            (
                p,
                Consumer({"bootstrap.servers": bootstrap, "group.id": "x"}).get_watermark_offsets(
                    TopicPartition(topic, p), timeout=10
                ),
            )
            for p in range(3)
        )
    }
    futures = admin.delete_records([TopicPartition(topic, p, marks[p]) for p in range(3)])
    for future in futures.values():
        future.result(timeout=30)
    assert _consume_all(bootstrap, topic, 3) == []

    plan = cli.ok("backup", "restore", "--backup-id", backup_id)
    assert f"Produce the 60 records of {topic} back into it" in plan.stdout
    assert "new offsets" in plan.stdout

    restored = cli.ok("backup", "restore", "--backup-id", backup_id, "--execute", "--yes")
    assert f"produced 60 records into {topic}" in restored.stderr
    again = _consume_all(bootstrap, topic, 3)
    assert Counter(again) == Counter(sent)
    audited = _rows(
        database_url, "SELECT action FROM audit_log WHERE action LIKE 'backup.%%' ORDER BY audit_id"
    )
    assert [r["action"] for r in audited] == [
        "backup.create.started",
        "backup.create.finished",
        "backup.verify.started",
        "backup.verify.finished",
        "backup.restore.started",
        "backup.restore.finished",
    ]


def test_kafka_restore_creates_a_missing_topic(
    database_url: str, tmp_path: Path, kafka_service: KafkaService
) -> None:
    bootstrap = kafka_service.bootstrap_servers
    cli = _cli(database_url, tmp_path, CARACAL_KAFKA_BOOTSTRAP_SERVERS=bootstrap)
    topic = f"caracal.audit.events.t{uuid.uuid4().hex[:8]}"
    kafka_service.create_topic(topic, num_partitions=2)
    producer = Producer({"bootstrap.servers": bootstrap})
    sent = []
    stamps = [int(time.time() * 1000) - 5_000 + i for i in range(10)]
    for i in range(10):
        producer.produce(
            topic, key=f"k{i}".encode(), value=f"v{i}".encode(), partition=i % 2, timestamp=stamps[i]
        )
        sent.append((f"k{i}".encode(), f"v{i}".encode(), (), i % 2))
    assert producer.flush(30) == 0
    backup_id = _create(cli, "--type", "kafka", "--topic", topic)["backup_id"]

    # restore under another name is not offered; restoring after the topic is gone recreates it
    admin = kafka_service.admin()
    (future,) = admin.delete_topics([topic]).values()
    future.result(timeout=30)
    deadline = datetime.now(UTC) + timedelta(seconds=30)
    while topic in admin.list_topics(timeout=10).topics and datetime.now(UTC) < deadline:
        time.sleep(0.1)
    plan = cli.ok("backup", "restore", "--backup-id", backup_id, "--new-timestamps")
    assert f"Create the missing topics {topic} (2 partitions)" in plan.stdout
    assert "the original one is in the header caracal.restore.original-timestamp" in plan.stdout
    cli.ok("backup", "restore", "--backup-id", backup_id, "--new-timestamps", "--execute", "--yes")
    restored = _consume_all(bootstrap, topic, 2)
    assert Counter((k, v, p) for k, v, _h, p in restored) == Counter((k, v, p) for k, v, _h, p in sent)
    originals = {int(dict(h)["caracal.restore.original-timestamp"]) for _k, _v, h, _p in restored}
    assert originals == set(stamps)

    wrong = cli("backup", "restore", "--backup-id", backup_id, "--topic", "caracal.dlq")
    assert wrong.exit_code == 2
    assert "has no topic caracal.dlq" in _error_line(wrong)


def test_restore_of_a_backup_from_an_older_schema(postgres_service: PostgresService, tmp_path: Path) -> None:
    """The database is at a newer schema than the backup: it is emptied, restored, then migrated."""
    migrations = available_migrations()
    name = f"t_{uuid.uuid4().hex[:16]}"
    postgres_service.create_database(name)
    url = postgres_service.admin_uri(name)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
                "checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for migration in migrations[:-1]:
                with conn.transaction():
                    conn.execute(migration.sql.encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                        (migration.version, migration.name, migration.checksum),
                    )
        cli = _cli(url, tmp_path)
        old = _create(cli, "--type", "postgresql", "--tag", "older-schema")
        assert old["postgresql"]["schema_version"] == len(migrations) - 1

        migrate(url)
        _agent(cli, "made-after-the-backup")
        plan = cli.ok("backup", "restore", "--backup-id", old["backup_id"]).stdout
        assert f"Empty the database's public schema: it is at schema version {len(migrations)}" in plan
        assert f"Apply the schema migrations after the backup's version {len(migrations) - 1}" in plan

        cli.ok("backup", "restore", "--backup-id", old["backup_id"], "--execute", "--yes")
        assert json.loads(cli.ok("agent", "list", "-o", "json").stdout) == []
        health = cli.ok("db", "health-check", "-o", "json")
        assert json.loads(health.stdout)["schema_version"] == len(migrations)
        actions = [r["action"] for r in _rows(url, "SELECT action FROM audit_log ORDER BY audit_id")]
        assert actions[-2:] == ["backup.restore.started", "backup.restore.finished"]
        assert cli("audit", "verify").exit_code == 0
    finally:
        postgres_service.drop_database(name)
