"""``caracal replay``: rewind a consumer group to a time or a snapshot, on the event log and on Kafka.

A replay reads applied events again and changes neither the ledger nor its totals.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY

from caracald.bus import pg_log
from caracald.bus.kafka import KafkaBatchConsumer, KafkaProducer, committed_offsets, create_topics
from caracald.consumers import ledger_writer
from caracald.consumers.ledger_writer import Backoff, LedgerWriter
from caracald.core.events import METERING_TOPIC
from tests.harness.kafka import KafkaService
from tests.integration.conftest import Cli
from tests.integration.pipeline import (
    Running,
    add_agents,
    event_log_committed,
    event_log_end,
    ledger_keys,
    make_events,
    raw_totals,
    send_events,
    totals,
    wait_for,
)

pytestmark = pytest.mark.integration

FAST = Backoff(initial=0.05, maximum=0.5)
GROUP = ledger_writer.GROUP


def event_log_writer(url: str) -> LedgerWriter:
    return LedgerWriter(
        pg_log.PgLogConsumer(url, GROUP, [METERING_TOPIC]),
        url,
        pg_log.PgLogProducer(url),
        batch_size=100,
        backoff=FAST,
    )


def drain(url: str) -> None:
    writer = event_log_writer(url)
    try:
        writer.run(idle_exit=1.0)
    finally:
        writer.close()
        writer.dlq_producer.close()


@pytest.fixture
def two_batches(database_url: str) -> dict[str, Any]:
    """300 events, a pause (the replay point), 200 more; all applied by the ledger writer."""
    agents = add_agents(database_url, 3)
    events = make_events(agents, 500)
    producer = pg_log.PgLogProducer(database_url)
    try:
        send_events(producer, events[:300])
        time.sleep(0.05)
        middle = datetime.now(UTC)
        time.sleep(0.05)
        send_events(producer, events[300:])
    finally:
        producer.close()
    drain(database_url)
    end = event_log_end(database_url, METERING_TOPIC)
    assert event_log_committed(database_url, GROUP, METERING_TOPIC) == end
    return {"events": events, "middle": middle, "end": end}


def snapshot(url: str) -> tuple[list[uuid.UUID], list[dict[str, Any]]]:
    return ledger_keys(url), totals(url)


def test_a_dry_run_by_default_then_execute_then_status(
    cli: Cli, database_url: str, two_batches: dict[str, Any]
) -> None:
    end, middle = two_batches["end"], two_batches["middle"]
    before = snapshot(database_url)
    out = cli.ok("replay", "start", "--from-timestamp", middle.isoformat(), "--consumer-group", GROUP)
    header, row = out.stdout.splitlines()[:2]
    assert header.split() == [
        "TOPIC",
        "PARTITION",
        "COMMITTED",
        "OFFSET",
        "NEW",
        "OFFSET",
        "END",
        "OFFSET",
        "EVENTS",
        "TO",
        "REPLAY",
    ]
    assert row.split() == [METERING_TOPIC, "0", f"{end:,}", f"{end - 200:,}", f"{end:,}", "200"]
    assert "Dry run: nothing was changed. Add --execute to do it." in out.stdout
    assert event_log_committed(database_url, GROUP, METERING_TOPIC) == end

    plan = json.loads(
        cli.ok(
            "replay", "start", "--from-timestamp", "2000-01-01", "--consumer-group", GROUP, "-o", "json"
        ).stdout
    )
    assert plan["partitions"] == [
        {
            "topic": METERING_TOPIC,
            "partition": 0,
            "committed_offset": end,
            "new_offset": end - 500,
            "end_offset": end,
            "events_to_replay": 500,
            "events_read_again": 500,
        }
    ]

    done = cli.ok(
        "replay",
        "start",
        "--from-timestamp",
        middle.isoformat(),
        "--consumer-group",
        GROUP,
        "--execute",
        "--yes",
    )
    assert "Offsets moved" in done.stdout
    assert event_log_committed(database_url, GROUP, METERING_TOPIC) == end - 200

    status = json.loads(cli.ok("replay", "status", "--consumer-group", GROUP, "-o", "json").stdout)
    (group,) = status
    assert group["lag"] == 200 and group["progress"] == 0
    assert group["partitions"][0]["replay_from"] == end - 200
    assert group["last_replay"]["by"] == "tester@example.com"
    table = cli.ok("replay", "status").stdout
    assert "0% (0 of 200)" in table and "in progress." in table

    drain(database_url)
    status = json.loads(cli.ok("replay", "status", "--consumer-group", GROUP, "-o", "json").stdout)
    assert status[0]["lag"] == 0 and status[0]["progress"] == 1
    assert "100% (200 of 200)" in cli.ok("replay", "status").stdout
    assert snapshot(database_url) == before  # the ledger and its totals: unchanged
    assert totals(database_url) == raw_totals(database_url)


def test_live_members_refuse_the_replay_unless_forced(
    cli: Cli, database_url: str, two_batches: dict[str, Any]
) -> None:
    end = two_batches["end"]
    before = snapshot(database_url)
    writer = event_log_writer(database_url)
    duplicates = (
        REGISTRY.get_sample_value("caracal_consumer_records_total", {"group": GROUP, "outcome": "duplicate"})
        or 0
    )
    with Running(writer, close=lambda: (writer.close(), writer.dlq_producer.close())):
        wait_for(lambda: writer.health.last_poll is not None, what="the writer polling")
        refused = cli("replay", "start", "--from-timestamp", "2000-01-01", "--consumer-group", GROUP)
        assert refused.exit_code == 2
        assert "has live members: caracal-consumer:ledger-writer-group (pid" in refused.stderr

        forced = cli.ok(
            "replay",
            "start",
            "--from-timestamp",
            "2000-01-01",
            "--consumer-group",
            GROUP,
            "--force",
            "--execute",
            "--yes",
        )
        assert "each notices at its next commit" in forced.stdout
        # The running writer notices at its next commit (a new event makes one) and reads everything again.
        extra = make_events(add_agents(database_url, 1), 1, start=1000)
        producer = pg_log.PgLogProducer(database_url)
        try:
            send_events(producer, extra)
        finally:
            producer.close()
        wait_for(
            lambda: event_log_committed(database_url, GROUP, METERING_TOPIC) == end + 1,
            what="the replay by the running writer",
        )
    after = (
        REGISTRY.get_sample_value("caracal_consumer_records_total", {"group": GROUP, "outcome": "duplicate"})
        or 0
    )
    assert after - duplicates >= 500
    keys, _ = snapshot(database_url)
    assert keys == [*before[0], extra[0].event_id]
    assert totals(database_url) == raw_totals(database_url)


def test_from_a_snapshot(cli: Cli, database_url: str, two_batches: dict[str, Any]) -> None:
    missing = cli("replay", "start", "--from-snapshot", str(uuid.uuid4()), "--consumer-group", GROUP)
    assert missing.exit_code == 1 and "not found" in missing.stderr
    created = json.loads(cli.ok("snapshot", "create", "-o", "json").stdout)
    out = cli.ok("replay", "start", "--from-snapshot", created["snapshot_id"], "--consumer-group", GROUP)
    # taken after every event: the replay starts an hour before it, so it covers them all
    assert "the replay starts 60 minutes earlier" in out.stdout
    assert out.stdout.splitlines()[1].split()[-1] == "500"
    assert cli("replay", "start", "--consumer-group", GROUP).exit_code == 2
    assert (
        cli("replay", "start", "--from-timestamp", "2000-01-01", "--consumer-group", "someone-else").exit_code
        == 2
    )


def test_replay_on_kafka(database_url: str, kafka_service: KafkaService) -> None:
    config = {"bootstrap.servers": kafka_service.bootstrap_servers}
    suffix = uuid.uuid4().hex[:8]
    topic, dlq_topic, group = f"test.metering.{suffix}", f"test.dlq.{suffix}", f"lw-{suffix}"
    create_topics(config, [topic], partitions=3, replication_factor=1)
    create_topics(config, [dlq_topic], partitions=1, replication_factor=1)
    events = make_events(add_agents(database_url, 6), 600)
    producer = KafkaProducer(config)
    try:
        send_events(producer, events[:400], topic=topic)
        time.sleep(0.1)
        middle = datetime.now(UTC)
        time.sleep(0.1)
        send_events(producer, events[400:], topic=topic)
    finally:
        producer.close()
    cli = Cli(
        database_url,
        env={
            "CARACAL__BUS__KIND": "kafka",
            "CARACAL_KAFKA_BOOTSTRAP_SERVERS": kafka_service.bootstrap_servers,
        },
    )

    def writer() -> LedgerWriter:
        return LedgerWriter(
            KafkaBatchConsumer(config, group, [topic]),
            database_url,
            KafkaProducer(config),
            dlq_topic=dlq_topic,
            backoff=FAST,
        )

    def committed() -> int:
        return sum(committed_offsets(config, group, topic).values())

    running = writer()
    with Running(running, close=lambda: (running.close(), running.dlq_producer.close())):
        wait_for(lambda: committed() >= 600, what="all committed")
        refused = cli(
            "replay",
            "start",
            "--from-timestamp",
            middle.isoformat(),
            "--consumer-group",
            group,
            "--topic",
            topic,
        )
        assert refused.exit_code == 2 and "has live members" in refused.stderr
    before = snapshot(database_url)
    wait_for(
        lambda: (
            cli(
                "replay",
                "start",
                "--from-timestamp",
                "2000-01-01",
                "--consumer-group",
                group,
                "--topic",
                topic,
            ).exit_code
            == 0
        ),
        what="the group to empty",
    )
    plan = json.loads(
        cli.ok(
            "replay",
            "start",
            "--from-timestamp",
            middle.isoformat(),
            "--consumer-group",
            group,
            "--topic",
            topic,
            "-o",
            "json",
        ).stdout
    )
    assert sum(p["events_to_replay"] for p in plan["partitions"]) == 200
    assert sum(p["committed_offset"] or 0 for p in plan["partitions"]) == 600  # None: a partition never used
    cli.ok(
        "replay",
        "start",
        "--from-timestamp",
        middle.isoformat(),
        "--consumer-group",
        group,
        "--topic",
        topic,
        "--execute",
        "--yes",
    )
    assert committed() == 400
    status = json.loads(
        cli.ok("replay", "status", "--consumer-group", group, "--topic", topic, "-o", "json").stdout
    )
    assert status[0]["lag"] == 200 and status[0]["progress"] == 0
    running = writer()
    with Running(running, close=lambda: (running.close(), running.dlq_producer.close())):
        wait_for(lambda: committed() >= 600, what="the replay")
    status = json.loads(
        cli.ok("replay", "status", "--consumer-group", group, "--topic", topic, "-o", "json").stdout
    )
    assert status[0]["lag"] == 0 and status[0]["progress"] == 1
    assert snapshot(database_url) == before
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM ledger_events").fetchone() == (600,)
