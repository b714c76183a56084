"""Poison records the hostile-input drill (bench/drills/hostile.py) found: each consumer dead-letters them and
goes on, with the good events behind them applied.

Before, a metering event whose ``extra`` was nested too deep to serialise crashed the ledger writer (and would
again on every restart), and an event or audit event whose time is out of range once converted to UTC, or a
metering event whose model is no valid Unicode, stalled the metrics aggregator or the audit logger for good
(the failure was taken for an outage and retried forever). Real PostgreSQL and Redis, the event log as the bus.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from caracald.bus import pg_log
from caracald.consumers import audit_logger, ledger_writer, metrics_aggregator
from caracald.consumers.ledger_writer import Backoff
from caracald.core.audit import AuditEntry, AuditEvent, AuditEventType, encode_event
from caracald.core.events import AUDIT_TOPIC, METERING_TOPIC, MeteringEvent, encode
from caracald.store import audit as audit_store
from tests.harness.redis_server import RedisService
from tests.integration.pipeline import (
    Running,
    add_agents,
    dead_letters,
    event_log_committed,
    event_log_end,
    ledger_keys,
    make_events,
    rows,
    send_events,
    wait_for,
)

pytestmark = pytest.mark.integration

FAST = Backoff(initial=0.05, maximum=0.5)
OUT_OF_RANGE = ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00")


def edited(event: MeteringEvent, raw: dict[str, bytes] | None = None, **changes: Any) -> tuple[bytes, bytes]:
    """``event`` as a record, with fields changed (``raw``: replaced by JSON text no encoder writes)."""
    body = {**json.loads(encode(event)), **changes, **dict.fromkeys(raw or {}, "\u2603")}
    value = json.dumps(body).encode()
    for name, text in (raw or {}).items():
        value = value.replace(f'"{name}": "\\u2603"'.encode(), f'"{name}": '.encode() + text, 1)
    return event.key, value


def poison(events: list[MeteringEvent]) -> list[tuple[bytes, bytes]]:
    """Real agents' events made poisonous: applied as they are, they would be in the ledger."""
    deep = [
        edited(e, {"extra": b'{"a":' * d + b"1" + b"}" * d})
        for e, d in zip(events, (1010, 1020), strict=False)
    ]
    late = [edited(e, occurred_at=when) for e, when in zip(events[2:], OUT_OF_RANGE, strict=False)]
    return [*deep, *late, edited(events[4], model="\ud800")]


def drained(url: str, group: str, topic: str) -> bool:
    return event_log_committed(url, group, topic) == event_log_end(url, topic)


def test_the_ledger_writer_dead_letters_poison_and_goes_on(database_url: str) -> None:
    agents = add_agents(database_url, 2)
    bad = poison(make_events(agents, 5, start=100))
    good = make_events(agents, 20)
    producer = pg_log.PgLogProducer(database_url)
    try:
        send_events(producer, [*bad, *good])
    finally:
        producer.close()
    writer = ledger_writer.build("postgres", database_url, batch_size=4, backoff=FAST)
    with Running(writer, lambda: (writer.close(), writer.dlq_producer.close())):
        wait_for(
            lambda: drained(database_url, ledger_writer.GROUP, METERING_TOPIC), 30, "the writer to drain"
        )
    assert sorted(ledger_keys(database_url)) == sorted(e.event_id for e in good)
    letters = dead_letters(database_url)
    assert len(letters) == len(bad)
    assert {letter["error_type"] for letter in letters} == {"EventDecodeError"}


def test_the_metrics_aggregator_dead_letters_poison_and_goes_on(
    database_url: str, redis_service: RedisService
) -> None:
    agents = [uuid.uuid4() for _ in range(2)]
    bad = poison(make_events(agents, 5, start=100))
    good = make_events(agents, 20)
    producer = pg_log.PgLogProducer(database_url)
    try:
        send_events(producer, [*bad, *good])
    finally:
        producer.close()
    namespace = f"t{uuid.uuid4().hex[:8]}"
    aggregator = metrics_aggregator.build(
        "postgres", database_url, redis_service.url, namespace=namespace, batch_size=4, backoff=FAST
    )
    with Running(aggregator):
        wait_for(
            lambda: drained(database_url, metrics_aggregator.GROUP, METERING_TOPIC),
            30,
            "the aggregator to drain",
        )
    letters = dead_letters(database_url)
    assert len(letters) == len(bad)
    assert {letter["consumer_group"] for letter in letters} == {metrics_aggregator.GROUP}
    client = metrics_aggregator.redis_client(redis_service.url)
    try:
        for event in good:
            key = metrics_aggregator.seen_key(namespace, event.occurred_at)
            assert client.sismember(key, str(event.event_id))
    finally:
        client.close()


def test_the_audit_logger_dead_letters_poison_and_goes_on(database_url: str) -> None:
    def event(n: int) -> AuditEvent:
        at = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=n)
        return AuditEvent.new(AuditEntry(at, "alice", AuditEventType.OPS_PROCEDURE, f"step{n}"))

    bad = [
        json.dumps({**json.loads(encode_event(event(n))), "occurred_at": when}).encode()
        for n, when in enumerate(OUT_OF_RANGE)
    ]
    good = [event(n) for n in range(10, 20)]
    with psycopg.connect(database_url) as conn:
        records = [(AUDIT_TOPIC, b"k", value, []) for value in [*bad, *(encode_event(e) for e in good)]]
        pg_log.append_records(conn, records)
        conn.commit()
    logger = audit_logger.build("postgres", database_url, batch_size=4, backoff=FAST)
    with Running(logger):
        wait_for(lambda: drained(database_url, audit_logger.GROUP, AUDIT_TOPIC), 30, "the logger to drain")
    assert len(dead_letters(database_url)) == len(bad)
    found = rows(database_url, "SELECT event_id FROM audit_log WHERE event_id IS NOT NULL ORDER BY audit_id")
    assert [r["event_id"] for r in found] == [e.event_id for e in good]
    with psycopg.connect(database_url, row_factory=psycopg.rows.dict_row) as conn:
        assert audit_store.verify_chain(conn).ok
