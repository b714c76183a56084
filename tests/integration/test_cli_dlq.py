"""``caracal dlq``: list (the runbook's block), get, retry (redrive) and purge, against real dead letters."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from caracald.bus import pg_log
from caracald.bus.kafka import KafkaBatchConsumer, KafkaProducer, create_topics
from caracald.consumers import ledger_writer
from caracald.consumers.ledger_writer import Backoff, LedgerWriter
from caracald.core.events import METERING_TOPIC, encode
from tests.harness.kafka import KafkaService
from tests.integration.conftest import Cli
from tests.integration.pipeline import (
    Running,
    add_agents,
    dead_letters,
    ledger_keys,
    make_events,
    rows,
    send_events,
    wait_for,
)

pytestmark = pytest.mark.integration

FAST = Backoff(initial=0.05, maximum=0.5)


def drain_ledger_writer(url: str) -> None:
    writer = LedgerWriter(
        pg_log.PgLogConsumer(url, ledger_writer.GROUP, [METERING_TOPIC]),
        url,
        pg_log.PgLogProducer(url),
        batch_size=50,
        backoff=FAST,
    )
    try:
        writer.run(idle_exit=1.0)
    finally:
        writer.close()
        writer.dlq_producer.close()


@pytest.fixture
def letters(database_url: str) -> dict[str, Any]:
    """Ten good events, two for an agent that does not exist yet, and one undecodable record."""
    agents = add_agents(database_url, 2)
    good = make_events(agents, 10)
    stranger = uuid.uuid4()
    orphans = make_events([stranger], 2, start=10)
    producer = pg_log.PgLogProducer(database_url)
    try:
        send_events(producer, [*good[:5], orphans[0], (b"k", b"\x00garbage"), *good[5:], orphans[1]])
    finally:
        producer.close()
    drain_ledger_writer(database_url)
    found = sorted(dead_letters(database_url), key=lambda d: d["source_offset"])
    assert [d["error_type"] for d in found] == [
        "ForeignKeyViolation",
        "EventDecodeError",
        "ForeignKeyViolation",
    ]
    return {"good": good, "orphans": orphans, "stranger": stranger, "ids": [d["dlq_id"] for d in found]}


def test_list_prints_the_runbook_block(cli: Cli, letters: dict[str, Any]) -> None:
    out = cli.ok("dlq", "list").stdout
    lines = out.splitlines()
    assert lines[:3] == ["Dead Letter Queue Events:", "  Total: 3", "  "]
    first = lines[3:9]
    assert [line.split(":", 1)[0] for line in first] == [
        "  Event ID",
        "  Source Topic",
        "  Error Type",
        "  Error Message",
        "  Retry Count",
        "  Failed At",
    ]
    listed = [int(line.split(": ")[1]) for line in lines if line.startswith("  Event ID: ")]
    assert sorted(listed) == sorted(letters["ids"])
    assert first[1] == "  Source Topic: caracal.metering.events"
    by_id = dict(
        zip(
            listed,
            [lines[i + 2] for i, line in enumerate(lines) if line.startswith("  Event ID: ")],
            strict=True,
        )
    )
    assert by_id[letters["ids"][0]] == "  Error Type: ForeignKeyViolation"
    assert by_id[letters["ids"][1]] == "  Error Type: EventDecodeError"
    assert any("agent_id" in line for line in lines if line.startswith("  Error Message: "))
    assert first[4] == "  Retry Count: 0"
    assert re.fullmatch(r"  Failed At: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", first[5])
    assert len(lines) == 3 + 3 * 7 - 1  # three events of six lines, separated by "  "

    data = json.loads(cli.ok("dlq", "list", "--format", "json").stdout)
    assert data["total"] == 3
    assert sorted(e["event_id"] for e in data["events"]) == sorted(letters["ids"])
    assert {e["error_type"] for e in data["events"]} == {"ForeignKeyViolation", "EventDecodeError"}


def test_list_filters(cli: Cli, letters: dict[str, Any]) -> None:
    def total(*args: str) -> int:
        return int(json.loads(cli.ok("dlq", "list", "-o", "json", *args).stdout)["total"])

    assert total("--error-type", "EventDecodeError") == 1
    assert total("--error-type", "PolicyEvaluationError") == 0
    assert total("--topic", "caracal.metering.events") == 3
    assert total("--topic", "caracal.audit.events") == 0
    assert total("--consumer-group", "ledger-writer-group") == 3
    assert total("--consumer-group", "audit-logger-group") == 0
    assert total("--start-time", "2000-01-01T00:00:00Z") == 3
    assert total("--start-time", "2999-01-01T00:00:00Z") == 0
    assert total("--status", "redriven") == 0
    assert total("--status", "all") == 3
    out = cli.ok("dlq", "list", "--limit", "1")
    assert out.stdout.count("Event ID") == 1 and "  Total: 3" in out.stdout
    assert "showing the oldest 1 of 3" in out.stderr
    bad = cli("dlq", "list", "--start-time", "yesterday-ish")
    assert bad.exit_code == 2 and bad.stderr.startswith("Error:")


def test_get_shows_payload_and_headers(cli: Cli, letters: dict[str, Any]) -> None:
    orphan = letters["orphans"][0]
    out = cli.ok("dlq", "get", "--event-id", str(letters["ids"][0])).stdout
    assert out.startswith("Dead Letter Queue Event:\n")
    assert f"  Metering Event ID: {orphan.event_id}" in out
    assert "  Consumer Group: ledger-writer-group" in out
    assert f"    caracal-event-id: {orphan.event_id}" in out
    assert f"  Payload: {encode(orphan).decode()}" in out
    assert f"  Key: {orphan.agent_id}" in out

    by_event = json.loads(cli.ok("dlq", "get", "--event-id", str(orphan.event_id), "-o", "json").stdout)
    assert by_event["event_id"] == letters["ids"][0]
    assert json.loads(by_event["payload"]["text"])["request_id"] == str(orphan.request_id)
    garbage = json.loads(cli.ok("dlq", "get", "--event-id", str(letters["ids"][1]), "-o", "json").stdout)
    assert garbage["payload"] == {"text": "\x00garbage"}
    assert garbage["headers"] == [{"name": "trace-id", "text": "t"}]

    missing = cli("dlq", "get", "--event-id", "999999")
    assert missing.exit_code == 1 and "no dead letter 999999" in missing.stderr
    assert cli("dlq", "get", "--event-id", "nonsense").exit_code == 2


def test_retry_redrives_once_and_the_ledger_absorbs_duplicates(
    cli: Cli, letters: dict[str, Any], database_url: str
) -> None:
    stranger = letters["stranger"]
    now = datetime.now(UTC)
    with psycopg.connect(database_url) as conn:  # the cause is fixed: the agent now exists
        conn.execute(
            "INSERT INTO agents (agent_id, name, owner, status, created_at, updated_at) "
            "VALUES (%s, 'late-agent', 'o@example.com', 'active', %s, %s)",
            (stranger, now, now),
        )
    first, garbage, second = letters["ids"]
    out = cli.ok("dlq", "retry", "--event-id", str(first), "--event-id", str(second))
    assert "Redriven: 2 dead letter(s)" in out.stdout
    assert "[1/1]" in out.stderr
    again = cli.ok("dlq", "retry", "--event-id", str(first))
    assert "Nothing to do." in again.stdout and "already resolved" in again.stdout

    drain_ledger_writer(database_url)
    keys = set(ledger_keys(database_url))
    assert {e.event_id for e in letters["orphans"]} <= keys
    assert len(keys) == 12
    status = {d["dlq_id"]: d["status"] for d in dead_letters(database_url)}
    assert status == {first: "redriven", garbage: "pending", second: "redriven"}

    # Redriving the garbage fails again: a new dead letter, the old one redriven.
    cli.ok("dlq", "retry", "--all-pending")
    drain_ledger_writer(database_url)
    found = dead_letters(database_url)
    assert [d["status"] for d in found] == ["redriven", "redriven", "redriven", "pending"]
    assert bytes(found[-1]["payload"]) == b"\x00garbage"
    headers = dict(pg_log.decode_headers(found[-1]["headers"]))
    assert headers["caracal-dlq-redrive-of"] == str(garbage).encode()
    # A second redrive of an event already in the ledger changes nothing.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE dlq_events SET status = 'pending', resolved_at = NULL, resolved_by = NULL WHERE dlq_id = %s",
            (first,),
        )
    cli.ok("dlq", "retry", "--event-id", str(first))
    drain_ledger_writer(database_url)
    assert len(ledger_keys(database_url)) == 12
    actions = [r["action"] for r in rows(database_url, "SELECT action FROM audit_log ORDER BY audit_id")]
    assert actions.count("dlq.retry.finished") == 3  # the no-op retry ran nothing, audited nothing


def test_purge_asks_for_the_typed_confirmation_and_is_audited(
    cli: Cli, letters: dict[str, Any], database_url: str
) -> None:
    first, garbage, _second = letters["ids"]
    refused = cli("dlq", "purge", "--event-id", str(garbage), input="no\n")
    assert refused.exit_code == 1 and "nothing was changed" in refused.stderr
    dry = cli.ok("dlq", "purge", "--event-id", str(garbage), "--dry-run")
    assert "[destructive]" in dry.stdout and "Dry run" in dry.stdout
    assert {d["status"] for d in dead_letters(database_url)} == {"pending"}

    done = cli.ok("dlq", "purge", "--event-id", str(garbage), input="purge\n", actor="carol@example.com")
    assert "Purged: 1 dead letter(s)" in done.stdout
    found = {d["dlq_id"]: d for d in dead_letters(database_url)}
    assert found[garbage]["status"] == "purged" and found[garbage]["resolved_by"] == "carol@example.com"
    assert json.loads(cli.ok("dlq", "list", "-o", "json").stdout)["total"] == 2

    cli.ok("dlq", "purge", "--before", "2999-01-01T00:00:00Z", "--yes")
    assert {d["status"] for d in dead_letters(database_url)} == {"purged"}
    assert "Nothing to do." in cli.ok("dlq", "purge", "--event-id", str(first), "--yes").stdout
    audit = rows(
        database_url,
        "SELECT actor, action, details FROM audit_log WHERE action LIKE 'dlq.purge.%%' ORDER BY audit_id",
    )
    assert [a["action"] for a in audit] == ["dlq.purge.started", "dlq.purge.finished"] * 2
    assert audit[1]["details"]["result"]["purged"] == [garbage]
    assert audit[0]["actor"] == "carol@example.com"
    assert cli("dlq", "purge").exit_code == 2
    assert cli("dlq", "retry").exit_code == 2


def test_retry_over_kafka_reproduces_the_original_record(
    database_url: str, kafka_service: KafkaService
) -> None:
    config = {"bootstrap.servers": kafka_service.bootstrap_servers}
    suffix = uuid.uuid4().hex[:8]
    topic, dlq_topic, group = f"test.metering.{suffix}", f"test.dlq.{suffix}", f"lw-{suffix}"
    create_topics(config, [topic], partitions=2, replication_factor=1)
    create_topics(config, [dlq_topic], partitions=1, replication_factor=1)
    orphan = make_events([uuid.uuid4()], 1)[0]
    producer = KafkaProducer(config)
    try:
        send_events(producer, [orphan], topic=topic)
    finally:
        producer.close()
    writer = LedgerWriter(
        KafkaBatchConsumer(config, group, [topic]),
        database_url,
        KafkaProducer(config),
        dlq_topic=dlq_topic,
        backoff=FAST,
    )
    with Running(writer, close=lambda: (writer.close(), writer.dlq_producer.close())):
        wait_for(lambda: len(dead_letters(database_url)) == 1, what="the dead letter")
    (letter,) = dead_letters(database_url)
    kafka_cli = Cli(
        database_url,
        env={
            "CARACAL__BUS__KIND": "kafka",
            "CARACAL_KAFKA_BOOTSTRAP_SERVERS": kafka_service.bootstrap_servers,
        },
    )
    kafka_cli.ok("dlq", "retry", "--event-id", str(letter["dlq_id"]))
    reader = KafkaBatchConsumer(config, f"reader-{suffix}", [topic])
    got: list[Any] = []
    try:
        wait_for(
            lambda: bool(got.extend(reader.poll_batch(10, 0.5))) or len(got) >= 2, what="the redriven record"
        )
    finally:
        reader.close()
    original, redriven = sorted(got, key=lambda r: (r.header("caracal-dlq-redrive-of") is not None, r.offset))
    assert redriven.value == original.value == encode(orphan)
    assert redriven.key == original.key
    assert redriven.header("caracal-event-id") == str(orphan.event_id).encode()
    assert redriven.header("caracal-dlq-redrive-of") == str(letter["dlq_id"]).encode()
