"""The audit logger and the metrics aggregator against real PostgreSQL, Redis and Kafka.

Both consumers are idempotent: redeliveries, duplicates on the topic and replays change nothing; a record
that is not an event is dead-lettered and the consumer goes on.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY
from redis import Redis

from caracal_ops.procedures.framework import Plan, execute
from caracald.bus import pg_log
from caracald.bus.audit import AuditEmitter, BusAuditSink
from caracald.bus.kafka import KafkaProducer, committed_offsets, create_topics, reset_offsets
from caracald.consumers import audit_logger, metrics_aggregator
from caracald.consumers.ledger_writer import Backoff
from caracald.consumers.metrics_aggregator import read
from caracald.core.audit import AuditEntry, AuditEvent, AuditEventType
from caracald.core.events import AUDIT_TOPIC, METERING_TOPIC
from caracald.core.ledger import LedgerEventType
from caracald.core.money import Money
from caracald.store import audit as audit_store
from tests.harness.kafka import KafkaService
from tests.harness.redis_server import RedisService
from tests.integration.pipeline import (
    Running,
    add_agents,
    dead_letters,
    event_log_committed,
    event_log_end,
    make_events,
    rows,
    send_events,
    wait_for,
)

pytestmark = pytest.mark.integration

FAST = Backoff(initial=0.05, maximum=0.5)


def entry(n: int, actor: str = "alice") -> AuditEntry:
    return AuditEntry(
        occurred_at=datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=n),
        actor=actor,
        event_type=AuditEventType.OPS_PROCEDURE,
        action=f"test.step{n}",
        subject_id=str(n),
        reason="because",
        details={"n": n, "text": "ünïcode"},
    )


def audit_rows(url: str) -> list[dict[str, Any]]:
    return rows(url, "SELECT * FROM audit_log ORDER BY audit_id")


def chain_ok(url: str) -> bool:
    with psycopg.connect(url, row_factory=psycopg.rows.dict_row) as conn:
        return audit_store.verify_chain(conn).ok


# --------------------------------------------------------------------------- the audit logger


def test_the_audit_logger_appends_each_event_once_over_the_event_log(database_url: str) -> None:
    emitter = AuditEmitter(pg_log.PgLogProducer(database_url))
    events = [AuditEvent.new(entry(n)) for n in range(300)]
    try:
        for event in events:
            emitter.send(event)
        for event in events[:50]:  # a retrying producer sends some twice
            emitter.send(event)
        assert emitter.flush(30) == 0
        emitter.send(AuditEvent.new(entry(999))).result(10)
    finally:
        emitter.close()
    with psycopg.connect(database_url) as conn:  # a record that is no audit event
        pg_log.append_records(conn, [(AUDIT_TOPIC, b"k", b"{not json", [])])
        conn.commit()
    # and one written directly by the CLI, in between: the chain covers both kinds
    with psycopg.connect(database_url, row_factory=psycopg.rows.dict_row) as conn, conn.transaction():
        audit_store.append(conn, entry(5000, actor="cli-user"))

    def drain() -> None:
        logger = audit_logger.build("postgres", database_url, batch_size=64, backoff=FAST)
        logger.run(idle_exit=1.0)
        logger.close()

    drain()
    found = audit_rows(database_url)
    assert len(found) == 302
    from_bus = [r for r in found if r["event_id"] is not None]
    assert [r["action"] for r in from_bus] == [*(f"test.step{n}" for n in range(300)), "test.step999"]
    assert [r["event_id"] for r in from_bus[:300]] == [e.event_id for e in events]
    assert [r["actor"] for r in found if r["event_id"] is None] == ["cli-user"]
    assert chain_ok(database_url)
    (letter,) = dead_letters(database_url)
    assert letter["consumer_group"] == "audit-logger-group"
    assert letter["error_type"] == "EventDecodeError"

    # A replay from the beginning appends nothing and dead-letters nothing twice.
    with psycopg.connect(database_url, autocommit=True) as conn:
        pg_log.reset_offsets(conn, "audit-logger-group", AUDIT_TOPIC, 0)
    drain()
    assert len(audit_rows(database_url)) == 302
    assert len(dead_letters(database_url)) == 1
    assert chain_ok(database_url)


def test_procedure_audit_records_travel_over_the_bus(database_url: str) -> None:
    emitter = AuditEmitter(pg_log.PgLogProducer(database_url))
    plan = Plan("test.bus", "A procedure audited over the bus")
    plan.add("one", "Step one", lambda step: "done")
    try:
        report = execute(plan, actor="bob", audit=BusAuditSink(emitter, "bob"))
    finally:
        emitter.close()
    logger = audit_logger.build("postgres", database_url, backoff=FAST)
    logger.run(idle_exit=1.0)
    logger.close()
    found = audit_rows(database_url)
    assert [r["action"] for r in found] == ["test.bus.started", "test.bus.finished"]
    assert {r["subject_id"] for r in found} == {report.run_id}
    assert {r["actor"] for r in found} == {"bob"}


def test_the_audit_logger_over_kafka(database_url: str, kafka_service: KafkaService) -> None:
    config = {"bootstrap.servers": kafka_service.bootstrap_servers}
    suffix = uuid.uuid4().hex[:8]
    topic, dlq_topic, group = f"test.audit.{suffix}", f"test.dlq.{suffix}", f"audit-{suffix}"
    create_topics(config, [topic], partitions=3, replication_factor=1)
    create_topics(config, [dlq_topic], partitions=1, replication_factor=1)
    emitter = AuditEmitter(KafkaProducer(config), topic=topic)
    events = [AuditEvent.new(entry(n, actor=f"actor-{n % 4}")) for n in range(200)]
    try:
        for event in [*events, *events[:20]]:
            emitter.send(event)
        emitter.producer.send(topic, b"\xff\xfe", key=b"x")
        assert emitter.flush(30) == 0
    finally:
        emitter.close()
    logger = audit_logger.build(
        "kafka",
        database_url,
        kafka_config=config,
        topic=topic,
        group=group,
        dlq_topic=dlq_topic,
        backoff=FAST,
    )
    with Running(logger):
        wait_for(lambda: sum(committed_offsets(config, group, topic).values()) >= 221, what="all committed")
    found = audit_rows(database_url)
    assert sorted(r["event_id"] for r in found) == sorted(e.event_id for e in events)
    # per actor (one partition each), the order of emission is kept
    for actor in {e.entry.actor for e in events}:
        mine = [r["action"] for r in found if r["actor"] == actor]
        assert mine == [e.entry.action for e in events if e.entry.actor == actor]
    assert chain_ok(database_url)
    assert [d["error_type"] for d in dead_letters(database_url)] == ["EventDecodeError"]

    reset_offsets(config, group, topic, 0)
    logger = audit_logger.build(
        "kafka",
        database_url,
        kafka_config=config,
        topic=topic,
        group=group,
        dlq_topic=dlq_topic,
        backoff=FAST,
    )
    with Running(logger):
        wait_for(lambda: sum(committed_offsets(config, group, topic).values()) >= 221, what="the replay")
        wait_for(lambda: logger.health.last_commit is not None, what="a commit")
    assert len(audit_rows(database_url)) == 200
    assert chain_ok(database_url)


# --------------------------------------------------------------------------- the metrics aggregator


def expected_aggregates(events: list[Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """What the agent-day and model-day hashes must hold, computed in Python from the events."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for e in events:
        for scope in (("agent", str(e.agent_id)), ("model", e.model or "-")):
            agg = out.setdefault(scope, {"spend": Decimal(0), "requests": 0, "settlements": 0, "output": 0})
            if e.kind is LedgerEventType.SETTLEMENT:
                agg["spend"] += e.cost.amount
                agg["settlements"] += 1
                agg["output"] += e.output_tokens or 0
            if e.kind is LedgerEventType.RESERVATION:
                agg["requests"] += 1
    return out


def check_aggregates(client: Redis, namespace: str, events: list[Any]) -> None:
    day = events[0].occurred_at
    assert all(e.occurred_at.date() == day.date() for e in events)
    for (scope, subject), want in expected_aggregates(events).items():
        got = read(client, scope, subject, "day", day, namespace=namespace)  # type: ignore[arg-type]
        assert got.spend.get("USD", Money(Decimal(0), "USD")).amount == want["spend"], (scope, subject)
        assert got.requests == want["requests"]
        assert got.events.get("settlement", 0) == want["settlements"]
        assert got.output_tokens == want["output"]
    everything = read(client, "all", None, "day", day, namespace=namespace)
    assert everything.spend["USD"].amount == sum(e.cost.amount for e in events)
    assert sum(everything.events.values()) == len(events)
    hours = {e.occurred_at.replace(minute=0, second=0) for e in events}
    assert sum(
        read(client, "all", None, "hour", h, namespace=namespace).spend["USD"].amount for h in hours
    ) == sum(e.cost.amount for e in events)


def spend_counter(agent: uuid.UUID) -> float:
    return (
        REGISTRY.get_sample_value(
            "caracal_agent_spend_ledger_units_total", {"agent_id": str(agent), "currency": "USD"}
        )
        or 0.0
    )


def test_the_aggregator_adds_each_event_once_over_the_event_log(
    database_url: str, redis_service: RedisService
) -> None:
    namespace = f"t{uuid.uuid4().hex[:8]}"
    agents = [uuid.uuid4() for _ in range(3)]  # the aggregator does not need the agents to exist
    events = make_events(agents, 1000)
    producer = pg_log.PgLogProducer(database_url)
    try:
        send_events(producer, [*events, *events[:100], (b"k", b"garbage"), (None, b'{"schema_version": 9}')])
    finally:
        producer.close()
    client = Redis.from_url(redis_service.url)

    def drain() -> None:
        aggregator = metrics_aggregator.build(
            "postgres", database_url, redis_service.url, namespace=namespace, batch_size=97, backoff=FAST
        )
        aggregator.run(idle_exit=1.0)
        aggregator.close()

    drain()
    check_aggregates(client, namespace, events)
    agent_units = sum(int(e.cost.amount * 10**8) for e in events if e.agent_id == agents[1])
    assert spend_counter(agents[1]) == agent_units
    assert sorted(d["error_type"] for d in dead_letters(database_url)) == [
        "EventDecodeError",
        "UnknownSchemaVersionError",
    ]
    assert event_log_committed(database_url, "metrics-aggregator-group", METERING_TOPIC) == event_log_end(
        database_url, METERING_TOPIC
    )

    with psycopg.connect(database_url, autocommit=True) as conn:
        pg_log.reset_offsets(conn, "metrics-aggregator-group", METERING_TOPIC, 0)
    drain()
    check_aggregates(client, namespace, events)
    assert spend_counter(agents[1]) == agent_units  # nothing counted twice in Prometheus either
    assert len(dead_letters(database_url)) == 2
    client.close()


def test_the_aggregator_over_kafka(
    database_url: str, redis_service: RedisService, kafka_service: KafkaService
) -> None:
    config = {"bootstrap.servers": kafka_service.bootstrap_servers}
    suffix = uuid.uuid4().hex[:8]
    topic, dlq_topic, group = f"test.metering.{suffix}", f"test.dlq.{suffix}", f"agg-{suffix}"
    create_topics(config, [topic], partitions=3, replication_factor=1)
    create_topics(config, [dlq_topic], partitions=1, replication_factor=1)
    events = make_events(add_agents(database_url, 4), 2000)
    producer = KafkaProducer(config)
    try:
        send_events(producer, [*events, *events[-300:], (b"k", b"[]")], topic=topic)
    finally:
        producer.close()
    namespace = f"t{suffix}"
    aggregator = metrics_aggregator.build(
        "kafka",
        database_url,
        redis_service.url,
        kafka_config=config,
        topic=topic,
        group=group,
        dlq_topic=dlq_topic,
        namespace=namespace,
        backoff=FAST,
    )
    with Running(aggregator):
        wait_for(lambda: sum(committed_offsets(config, group, topic).values()) >= 2301, what="all committed")
    client = Redis.from_url(redis_service.url)
    check_aggregates(client, namespace, events)
    client.close()


def test_the_seen_sets_expire_after_the_topics_retention(
    redis_service: RedisService, database_url: str
) -> None:
    namespace = f"t{uuid.uuid4().hex[:8]}"
    events = make_events([uuid.uuid4()], 2)
    producer = pg_log.PgLogProducer(database_url)
    try:
        send_events(producer, events)
    finally:
        producer.close()
    aggregator = metrics_aggregator.build("postgres", database_url, redis_service.url, namespace=namespace)
    aggregator.run(idle_exit=1.0)
    aggregator.close()
    client = Redis.from_url(redis_service.url)
    seen = metrics_aggregator.seen_key(namespace, events[0].occurred_at)
    assert client.scard(seen) == 2
    assert 8 * 86400 - 60 < client.ttl(seen) <= 8 * 86400  # from the last addition, whatever the event's age
    hour_key = metrics_aggregator.key(
        namespace, "agent", str(events[0].agent_id), "hour", events[0].occurred_at
    )
    assert 0 < client.ttl(hour_key) <= 14 * 86400
    client.close()
