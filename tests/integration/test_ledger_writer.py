"""The ledger writer against real Kafka and PostgreSQL: every metering event lands exactly once.

Each test makes its own topics and consumer group on the shared broker and gets its own database.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY

from caracald.bus import pg_log
from caracald.bus.base import event_headers
from caracald.bus.kafka import (
    KafkaBatchConsumer,
    KafkaProducer,
    committed_offsets,
    create_topics,
    reset_offsets,
)
from caracald.consumers.ledger_writer import Backoff, LedgerWriter
from caracald.core.events import METERING_TOPIC, MeteringEvent, encode
from caracald.core.ledger import LedgerEventType
from caracald.core.money import Money
from tests.harness.kafka import KafkaService
from tests.integration.pipeline import Running

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FAST_BACKOFF = Backoff(initial=0.05, maximum=0.5)


# --------------------------------------------------------------------------- helpers


@dataclass
class Setup:
    url: str
    config: dict[str, Any]
    topic: str
    dlq_topic: str
    group: str
    agents: list[uuid.UUID]


def add_agents(url: str, count: int) -> list[uuid.UUID]:
    agents = [uuid.uuid4() for _ in range(count)]
    now = datetime.now(UTC)
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO agents (agent_id, name, owner, status, created_at, updated_at) "
            "VALUES (%s, %s, 'tests@example.com', 'active', %s, %s)",
            [(a, f"agent-{a.hex[:12]}", now, now) for a in agents],
        )
    return agents


@pytest.fixture
def setup(database_url: str, kafka_service: KafkaService) -> Setup:
    config = {"bootstrap.servers": kafka_service.bootstrap_servers}
    suffix = uuid.uuid4().hex[:10]
    topic, dlq_topic = f"test.metering.{suffix}", f"test.dlq.{suffix}"
    create_topics(config, [topic], partitions=3, replication_factor=1)
    create_topics(config, [dlq_topic], partitions=1, replication_factor=1)
    return Setup(
        database_url, config, topic, dlq_topic, f"ledger-writer-{suffix}", add_agents(database_url, 5)
    )


def make_events(
    agents: Sequence[uuid.UUID], count: int, *, start: int = 0, resource: str = ""
) -> list[MeteringEvent]:
    base = datetime(2025, 3, 1, tzinfo=UTC)
    events = []
    for n in range(start, start + count):
        settle = n % 2 == 1
        events.append(
            MeteringEvent(
                kind=LedgerEventType.SETTLEMENT if settle else LedgerEventType.RESERVATION,
                request_id=uuid.uuid4(),
                agent_id=agents[n % len(agents)],
                occurred_at=base + timedelta(seconds=n),
                cost=Money(Decimal(n) / Decimal(1000), "USD") if settle else Money(Decimal(0), "USD"),
                resource=resource or f"https://api.openai.com/v1/chat/completions?n={n}",
                model="gpt-4o",
                hold=None if settle else Money(Decimal("0.05"), "USD"),
                input_tokens=n if settle else None,
                output_tokens=2 * n if settle else None,
                policy_ids=(agents[0],),
            )
        )
    return events


def produce(
    setup: Setup, items: Sequence[MeteringEvent | tuple[bytes, bytes, list[tuple[str, bytes]]]]
) -> int:
    """Send events (or raw (key, value, headers) records) to the test topic; return how many."""
    producer = KafkaProducer(setup.config)
    try:
        for item in items:
            if isinstance(item, MeteringEvent):
                producer.send(setup.topic, encode(item), key=item.key, headers=event_headers(item))
            else:
                key, value, headers = item
                producer.send(setup.topic, value, key=key, headers=headers)
        assert producer.flush(60) == 0
    finally:
        producer.close()
    return len(items)


def kafka_writer(setup: Setup, **options: Any) -> LedgerWriter:
    options.setdefault("backoff", FAST_BACKOFF)
    options.setdefault("batch_size", 500)
    return LedgerWriter(
        KafkaBatchConsumer(setup.config, setup.group, [setup.topic]),
        setup.url,
        KafkaProducer(setup.config),
        dlq_topic=setup.dlq_topic,
        **options,
    )


def committed(setup: Setup) -> int:
    return sum(committed_offsets(setup.config, setup.group, setup.topic).values())


def wait_for(condition: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def running(writer: LedgerWriter) -> Running:
    """The writer on a thread, stopped gracefully on exit; its dead-letter producer closed with it."""

    def close() -> None:
        writer.close()
        writer.dlq_producer.close()

    return Running(writer, close)


def run_until_committed(setup: Setup, total: int, **options: Any) -> LedgerWriter:
    writer = kafka_writer(setup, **options)
    with running(writer):
        wait_for(lambda: committed(setup) >= total, what=f"{total} records committed")
    return writer


def ledger(url: str) -> list[dict[str, Any]]:
    with psycopg.connect(url, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute("SELECT * FROM ledger_events ORDER BY event_id").fetchall()


def ledger_count(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM ledger_events").fetchone()
    return int(row[0]) if row else 0


def dead_letters(url: str) -> list[dict[str, Any]]:
    with psycopg.connect(url, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute("SELECT * FROM dlq_events ORDER BY source_partition, source_offset").fetchall()


def dlq_topic_records(setup: Setup, expected: int) -> list[Any]:
    consumer = KafkaBatchConsumer(setup.config, f"dlq-reader-{uuid.uuid4().hex[:8]}", [setup.dlq_topic])
    got: list[Any] = []
    try:
        deadline = time.monotonic() + 30
        while len(got) < expected and time.monotonic() < deadline:
            got += consumer.poll_batch(100, 0.5)
    finally:
        consumer.close()
    return got


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def lag(setup: Setup) -> float | None:
    values = [
        REGISTRY.get_sample_value(
            "caracal_kafka_consumer_lag", {"group": setup.group, "topic": setup.topic, "partition": str(p)}
        )
        for p in range(3)
    ]
    return None if None in values else sum(v or 0.0 for v in values)


# --------------------------------------------------------------------------- exactly once


def test_events_land_exactly_once_and_a_replay_changes_nothing(setup: Setup) -> None:
    events = make_events(setup.agents, 3000)
    total = produce(setup, [*events, *events[:200]])  # 200 sent twice, as a retrying gateway would
    run_until_committed(setup, total)

    rows = ledger(setup.url)
    assert len(rows) == 3000
    assert {r["idempotency_key"] for r in rows} == {e.event_id for e in events}
    by_key = {r["idempotency_key"]: r for r in rows}
    sample = events[7]
    row = by_key[sample.event_id]
    assert (row["event_type"], row["agent_id"], row["request_id"]) == (
        "settlement",
        sample.agent_id,
        sample.request_id,
    )
    assert row["cost"] == Decimal("0.007") and row["currency"].strip() == "USD"
    assert (row["input_tokens"], row["output_tokens"], row["cached_input_tokens"]) == (7, 14, None)
    assert row["occurred_at"] == sample.occurred_at
    assert row["metadata"] == {"policy_ids": [str(setup.agents[0])]}
    assert by_key[events[8].event_id]["metadata"]["hold"] == "0.05000000"

    assert metric("caracal_consumer_records_total", group=setup.group, outcome="duplicate") == 200
    assert metric("caracal_kafka_message_processing_duration_seconds_count", group=setup.group) > 0
    assert metric("caracal_database_queries_total", operation="ledger_batch", outcome="ok") > 0
    assert metric("caracal_consumer_ready", group=setup.group) == 1

    # Replay the whole topic from offset 0: nothing changes.
    before = [(r["event_id"], r["idempotency_key"]) for r in rows]
    reset_offsets(setup.config, setup.group, setup.topic, 0)
    duplicates_before = metric("caracal_consumer_records_total", group=setup.group, outcome="duplicate")
    writer = kafka_writer(setup)
    with running(writer):
        wait_for(
            lambda: (
                metric("caracal_consumer_records_total", group=setup.group, outcome="duplicate")
                >= duplicates_before + total
            ),
            what="the replay",
        )
        wait_for(lambda: committed(setup) >= total, what="the replay's commits")
        wait_for(lambda: lag(setup) == 0, what="the lag gauge to settle at 0")
    assert [(r["event_id"], r["idempotency_key"]) for r in ledger(setup.url)] == before
    assert dead_letters(setup.url) == []


# --------------------------------------------------------------------------- dead letters


def test_undecodable_and_unknown_schema_records_go_to_the_dlq_and_the_writer_goes_on(setup: Setup) -> None:
    good = make_events(setup.agents, 2)
    future_body = json.loads(encode(good[0]))
    future_body["schema_version"] = 2
    key = b"same-partition"
    records: list[Any] = [
        (key, encode(good[0]), event_headers(good[0])),
        (key, b"{not json", [("trace-id", b"abc123")]),
        (key, json.dumps(future_body).encode(), [("trace-id", b"def456")]),
        (key, encode(good[1]), event_headers(good[1])),
    ]
    errors_before = metric(
        "caracal_kafka_consumer_errors_total", group=setup.group, error_type="EventDecodeError"
    )
    run_until_committed(setup, produce(setup, records))

    assert {r["idempotency_key"] for r in ledger(setup.url)} == {e.event_id for e in good}
    letters = dead_letters(setup.url)
    assert [d["error_type"] for d in letters] == ["EventDecodeError", "UnknownSchemaVersionError"]
    malformed, unknown = letters
    assert bytes(malformed["payload"]) == b"{not json"
    assert bytes(malformed["message_key"]) == key
    assert malformed["headers"] == [["trace-id", "YWJjMTIz"]]  # base64 of abc123
    assert (malformed["source_topic"], malformed["consumer_group"]) == (setup.topic, setup.group)
    assert unknown["source_offset"] == malformed["source_offset"] + 1
    assert "schema version 2" in unknown["error_message"]
    assert all(d["status"] == "pending" and d["retry_count"] == 0 and d["event_id"] is None for d in letters)

    on_topic = dlq_topic_records(setup, 2)
    assert [r.value for r in on_topic] == [b"{not json", json.dumps(future_body).encode()]
    headers = dict(on_topic[0].headers)
    assert headers["trace-id"] == b"abc123"  # the original headers travel along
    assert headers["caracal-dlq-error-type"] == b"EventDecodeError"
    assert headers["caracal-dlq-source-topic"] == setup.topic.encode()
    assert headers["caracal-dlq-source-offset"] == str(malformed["source_offset"]).encode()
    assert headers["caracal-dlq-consumer-group"] == setup.group.encode()

    assert (
        metric("caracal_kafka_consumer_errors_total", group=setup.group, error_type="EventDecodeError")
        == errors_before + 1
    )
    assert metric("caracal_dlq_size") == 2
    assert metric("caracal_dlq_oldest_message_age_seconds") >= 0


def test_an_unknown_agent_is_dead_lettered_and_the_rest_of_its_batch_applied(setup: Setup) -> None:
    good = make_events(setup.agents, 100)
    stranger = make_events([uuid.uuid4()], 1, start=1)[0]
    run_until_committed(setup, produce(setup, [*good[:50], stranger, *good[50:]]), batch_size=5000)

    assert {r["idempotency_key"] for r in ledger(setup.url)} == {e.event_id for e in good}
    [letter] = dead_letters(setup.url)
    assert letter["error_type"] == "ForeignKeyViolation"
    assert letter["event_id"] == stranger.event_id
    assert str(stranger.agent_id) in letter["error_message"]
    assert letter["retry_count"] == 0
    [on_topic] = dlq_topic_records(setup, 1)
    assert dict(on_topic.headers)["caracal-dlq-event-id"] == str(stranger.event_id).encode()


def test_a_dependency_still_failing_after_bounded_retries_dead_letters_the_record(setup: Setup) -> None:
    with psycopg.connect(setup.url) as conn:
        conn.execute(
            """
            CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.resource = 'https://slow.example/' THEN PERFORM pg_sleep(2); END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER slow_insert BEFORE INSERT ON ledger_events FOR EACH ROW EXECUTE FUNCTION slow_insert();
            """
        )
    good = make_events(setup.agents, 20)
    slow = make_events(setup.agents, 1, start=20, resource="https://slow.example/")[0]
    total = produce(setup, [*good[:10], slow, *good[10:]])
    run_until_committed(setup, total, statement_timeout_ms=300, max_retries=2)

    assert {r["idempotency_key"] for r in ledger(setup.url)} == {e.event_id for e in good}
    [letter] = dead_letters(setup.url)
    assert (letter["error_type"], letter["event_id"], letter["retry_count"]) == (
        "QueryCanceled",
        slow.event_id,
        2,
    )


# --------------------------------------------------------------------------- failures of PostgreSQL


def test_offsets_stay_uncommitted_while_the_database_fails_and_the_batch_is_retried(setup: Setup) -> None:
    events = make_events(setup.agents, 100)
    total = produce(setup, events)
    with psycopg.connect(setup.url) as conn:
        conn.execute("ALTER TABLE ledger_events RENAME TO ledger_events_away")
    writer = kafka_writer(setup)
    with running(writer):
        wait_for(
            lambda: "ledger_events" in (writer.health.last_error or "") and not writer.health.ready,
            what="the failing insert",
        )
        time.sleep(1.0)  # several retries
        assert committed_offsets(setup.config, setup.group, setup.topic) == {}
        assert writer.health.live()
        with psycopg.connect(setup.url) as conn:
            conn.execute("ALTER TABLE ledger_events_away RENAME TO ledger_events")
        wait_for(lambda: committed(setup) >= total, what="the retried batch")
        wait_for(lambda: writer.health.ready, what="readiness")
    assert {r["idempotency_key"] for r in ledger(setup.url)} == {e.event_id for e in events}
    assert dead_letters(setup.url) == []


@pytest.mark.parametrize("database_workers", [1, 2])
def test_terminated_database_connections_lose_and_duplicate_nothing(
    setup: Setup, database_workers: int
) -> None:
    # With two database threads, two batches are in flight on two connections, and both are cut.
    events = make_events(setup.agents, 6000)
    writer = kafka_writer(setup, batch_size=300, database_workers=database_workers)
    stop_killing = threading.Event()
    kills = 0

    def killer() -> None:
        nonlocal kills
        with psycopg.connect(setup.url, autocommit=True) as conn:
            while not stop_killing.wait(0.15):
                row = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name LIKE 'caracal-ledger-writer%%'"
                ).fetchone()
                kills += int(row[0]) if row else 0

    with running(writer):
        thread = threading.Thread(target=killer)
        thread.start()
        try:
            for chunk in range(0, 6000, 1000):
                produce(setup, events[chunk : chunk + 1000])
            wait_for(lambda: ledger_count(setup.url) >= 3000, what="progress under fire")
        finally:
            stop_killing.set()
            thread.join(10)
        wait_for(lambda: committed(setup) >= 6000, what="all records committed")
    assert kills > 0
    rows = ledger(setup.url)
    assert len(rows) == 6000
    assert {r["idempotency_key"] for r in rows} == {e.event_id for e in events}


def test_the_writer_commits_synchronously_whatever_the_server_default(setup: Setup) -> None:
    with psycopg.connect(setup.url) as conn:
        server_default = conn.execute("SHOW synchronous_commit").fetchone()
    assert server_default == ("off",)  # the test server trades durability for speed
    writer = kafka_writer(setup)
    try:
        assert writer._connection().execute("SHOW synchronous_commit").fetchone() == ("on",)
    finally:
        writer.close()
        writer.dlq_producer.close()


def test_an_idle_writer_reports_the_database_going_away_and_coming_back(
    setup: Setup, postgres_service: Any
) -> None:
    name = setup.url.split("?")[0].rsplit("/", 1)[1]
    writer = kafka_writer(setup, dlq_stats_interval=0.2)
    with running(writer):
        wait_for(lambda: writer.health.ready, what="readiness")
        with postgres_service.connect() as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            try:
                wait_for(lambda: not writer.health.ready, what="not ready")
                assert writer.health.live()
            finally:
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        wait_for(lambda: writer.health.ready, what="ready again")
        events = make_events(setup.agents, 10)
        produce(setup, events)
        wait_for(lambda: committed(setup) >= 10, what="the batch after the outage")
    assert ledger_count(setup.url) == 10


# --------------------------------------------------------------------------- the process: kill -9, SIGTERM


def start_writer_process(setup: Setup, *extra: str) -> subprocess.Popen[bytes]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CARACAL")},
        "CARACAL_DATABASE_URL": setup.url,
        "CARACAL_KAFKA_BOOTSTRAP_SERVERS": setup.config["bootstrap.servers"],
        "PYTHONPATH": str(ROOT),
    }
    argv = [
        sys.executable,
        "-m",
        "caracald.consumers.ledger_writer",
        "--bus",
        "kafka",
        "--topic",
        setup.topic,
        "--group",
        setup.group,
        "--dlq-topic",
        setup.dlq_topic,
        "--log-level",
        "WARNING",
        *extra,
    ]
    return subprocess.Popen(argv, cwd=ROOT, env=env, stderr=subprocess.PIPE)


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60
) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"the writer did not stop within {timeout} s: {err.decode()[-2000:]}") from None
    return proc.returncode, err.decode()


@pytest.fixture
def many_events(setup: Setup) -> tuple[Setup, list[MeteringEvent]]:
    events = make_events(setup.agents, 20_000)
    produce(setup, events)
    return setup, events


def test_kill_9_mid_stream_then_restart_is_exactly_once(
    many_events: tuple[Setup, list[MeteringEvent]],
) -> None:
    setup, events = many_events
    proc = start_writer_process(setup, "--batch-size", "500")
    try:
        wait_for(lambda: ledger_count(setup.url) >= 2000 or proc.poll() is not None, what="progress")
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    finally:
        code, _ = stop_process(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL
    written = ledger_count(setup.url)
    assert 0 < written < len(events), "the kill should land mid-stream"

    proc = start_writer_process(setup, "--batch-size", "500")
    try:
        wait_for(lambda: committed(setup) >= len(events), timeout=120, what="the restarted writer")
    finally:
        code, err = stop_process(proc)
    assert code == 0, err[-2000:]
    rows = ledger(setup.url)
    assert len(rows) == len(events)
    assert {r["idempotency_key"] for r in rows} == {e.event_id for e in events}


def test_sigterm_finishes_the_batch_commits_and_exits(many_events: tuple[Setup, list[MeteringEvent]]) -> None:
    setup, events = many_events
    proc = start_writer_process(setup, "--batch-size", "1000")
    try:
        wait_for(lambda: ledger_count(setup.url) >= 3000 or proc.poll() is not None, what="progress")
    finally:
        code, err = stop_process(proc, signal.SIGTERM)
    assert code == 0, err[-2000:]
    written = ledger_count(setup.url)
    # Every record it applied was committed, and nothing it committed is missing: no half batch.
    assert committed(setup) == written
    assert 0 < written <= len(events)


# --------------------------------------------------------------------------- the embedded bus


def test_the_same_writer_over_the_postgres_event_log_is_exactly_once(database_url: str) -> None:
    agents = add_agents(database_url, 3)
    events = make_events(agents, 2000)
    stranger = make_events([uuid.uuid4()], 1, start=1)[0]
    producer = pg_log.PgLogProducer(database_url)
    group = "ledger-writer-group"
    try:
        for e in [*events[:1000], stranger, *events[500:1000], *events[1000:]]:  # 500 sent twice
            producer.send(METERING_TOPIC, encode(e), key=e.key, headers=event_headers(e))
        producer.send(METERING_TOPIC, b"\x00garbage", key=b"k", headers=[("trace-id", b"x")])
        assert producer.flush(30) == 0
    finally:
        producer.close()
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT max(log_offset) FROM event_log WHERE topic = %s", (METERING_TOPIC,)
        ).fetchone()
    assert row is not None
    end = int(row[0]) + 1

    def run_once() -> LedgerWriter:
        writer = LedgerWriter(
            pg_log.PgLogConsumer(database_url, group, [METERING_TOPIC]),
            database_url,
            pg_log.PgLogProducer(database_url),
            batch_size=300,
            backoff=FAST_BACKOFF,
        )

        def done() -> bool:
            with psycopg.connect(database_url) as conn:
                return pg_log.committed_offsets(conn, group).get((METERING_TOPIC, 0), 0) >= end

        with running(writer):
            wait_for(done, what="the event log drained")
        return writer

    run_once()
    rows = ledger(database_url)
    assert len(rows) == 2000
    assert {r["idempotency_key"] for r in rows} == {e.event_id for e in events}
    letters = dead_letters(database_url)
    assert sorted(d["error_type"] for d in letters) == ["EventDecodeError", "ForeignKeyViolation"]
    with psycopg.connect(database_url) as conn:
        dlq_rows = conn.execute(
            "SELECT payload, headers FROM event_log WHERE topic = 'caracal.dlq'"
        ).fetchall()
    assert len(dlq_rows) == 2
    assert {bytes(p) for p, _ in dlq_rows} == {b"\x00garbage", encode(stranger)}

    # A replay from offset 0 changes nothing, and records no dead letter twice.
    before = [(r["event_id"], r["idempotency_key"]) for r in rows]
    with psycopg.connect(database_url) as conn:
        pg_log.reset_offsets(conn, group, METERING_TOPIC, 0)
    run_once()
    assert [(r["event_id"], r["idempotency_key"]) for r in ledger(database_url)] == before
    assert len(dead_letters(database_url)) == 2
