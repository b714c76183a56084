"""Faults against the running pipeline, with real services and the real daemons (processes):

* a malformed event never stops a consumer;
* ``kill -9`` of a ledger writer mid-stream, then a restart, loses and duplicates nothing;
* a Kafka broker restart mid-stream, and PostgreSQL outages (connections terminated in a loop, the database
  renamed away), make the consumers pause, retry and resume on their own.

Each check ends with the invariants: every event once in the ledger, spend totals equal to the raw sums,
Redis aggregates equal to what the events add up to, each audit event once in a chain that verifies.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from redis import Redis

from caracald.bus import pg_log
from caracald.bus.audit import AuditEmitter
from caracald.bus.base import BusError, RecordProducer
from caracald.bus.kafka import KafkaProducer, committed_offsets, create_topics
from caracald.consumers.metrics_aggregator import read
from caracald.core.audit import AuditEntry, AuditEvent, AuditEventType
from caracald.core.events import AUDIT_TOPIC, METERING_TOPIC, MeteringEvent
from caracald.store import audit as audit_store
from tests.harness.kafka import KafkaService
from tests.harness.ports import free_port
from tests.harness.postgres import PostgresService
from tests.harness.redis_server import RedisService
from tests.integration.pipeline import (
    add_agents,
    dead_letters,
    event_log_committed,
    event_log_end,
    ledger_count,
    ledger_keys,
    make_events,
    rows,
    send_events,
    start_daemon,
    stop_daemon,
    totals_beside_raw,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration

CONSUMERS = ("ledger-writer", "metrics-aggregator", "audit-logger")
GROUPS = {
    "ledger-writer": ("ledger-writer-group", METERING_TOPIC),
    "metrics-aggregator": ("metrics-aggregator-group", METERING_TOPIC),
    "audit-logger": ("audit-logger-group", AUDIT_TOPIC),
}


@dataclass
class Daemons:
    """The three consumers as processes, with their health ports and logs."""

    procs: dict[str, Any]
    health: dict[str, int]
    logs: dict[str, Path]

    def ready(self, name: str) -> bool:
        import urllib.error
        import urllib.request

        try:
            url = f"http://127.0.0.1:{self.health[name]}/readyz"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def alive(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, (
                f"{name} exited ({proc.returncode}): {self.logs[name].read_text()[-3000:]}"
            )

    def stop(self) -> None:
        for name, proc in self.procs.items():
            code = stop_daemon(proc, signal.SIGTERM, timeout=60)
            assert code == 0, f"{name} exited {code}: {self.logs[name].read_text()[-3000:]}"


@pytest.fixture
def run_daemons(tmp_path: Path) -> Iterator[Any]:
    started: list[Daemons] = []

    def start(
        config: Path, names: tuple[str, ...] = CONSUMERS, extra: dict[str, list[str]] | None = None
    ) -> Daemons:
        procs, health, logs = {}, {}, {}
        for name in names:
            health[name] = free_port()
            logs[name] = tmp_path / f"{name}.log"
            args = ["--health-port", str(health[name]), "--metrics-port", "0", "--listen-host", "127.0.0.1"]
            procs[name] = start_daemon(name, config, *args, *(extra or {}).get(name, []), log=logs[name])
        found = Daemons(procs, health, logs)
        started.append(found)
        return found

    yield start
    for found in started:
        for proc in found.procs.values():
            if proc.poll() is None:
                stop_daemon(proc, signal.SIGKILL)


def audit_event(n: int) -> AuditEvent:
    return AuditEvent.new(
        AuditEntry(
            datetime.now(UTC), f"actor-{n % 3}", AuditEventType.OPS_PROCEDURE, f"fault.{n}", details={"n": n}
        )
    )


def check_ledger(url: str, events: list[MeteringEvent]) -> None:
    keys = ledger_keys(url)
    assert len(keys) == len(set(keys)) == len(events), (len(keys), len(set(keys)), len(events))
    assert set(keys) == {e.event_id for e in events}
    kept, raw = totals_beside_raw(url)
    assert kept == raw


def check_aggregates(redis_url: str, events: list[MeteringEvent], namespace: str = "caracal") -> None:
    """Per agent (the daemons share the default namespace across tests; agents are unique to a test)."""
    client = Redis.from_url(redis_url)
    try:
        for agent in {e.agent_id for e in events}:
            mine = [e for e in events if e.agent_id == agent]
            got = read(client, "agent", str(agent), "day", events[0].occurred_at, namespace=namespace)
            spent = got.spend["USD"].amount if "USD" in got.spend else Decimal(0)
            assert spent == sum((e.cost.amount for e in mine), Decimal(0))
            assert sum(got.events.values()) == len(mine)
    finally:
        client.close()


def check_audit(url: str, events: list[AuditEvent]) -> None:
    found = rows(url, "SELECT event_id FROM audit_log WHERE event_id IS NOT NULL")
    assert sorted(r["event_id"] for r in found) == sorted(e.event_id for e in events)
    with psycopg.connect(url, row_factory=psycopg.rows.dict_row) as conn:
        assert audit_store.verify_chain(conn).ok


def emit_audit(producer: RecordProducer, events: list[AuditEvent], topic: str = AUDIT_TOPIC) -> None:
    emitter = AuditEmitter(producer, topic=topic, timeout=180)
    futures = [emitter.send(e) for e in events]
    emitter.flush(180)
    for future in futures:
        future.result(180)


# --------------------------------------------------------------------------- malformed events


MALFORMED_METERING = [
    b"",
    b"\x00\x01\x02",
    b"not json at all",
    b"[1, 2, 3]",
    b'{"schema_version": 2}',
    b'{"schema_version": 1}',
    b'{"schema_version": 1, "kind": "settlement", "request_id": "x", "agent_id": "y"}',
    b'{"schema_version": 1, "cost": "\\ud800"}',
    b'{"schema_version": 1, "kind": "settlement", "cost": "1e999999999"}',
    b"\xff" * 10_000,
]
MALFORMED_AUDIT = [
    b"",
    b"{",
    b'{"schema_version": 1}',
    b'{"schema_version": 7, "event_id": "00000000-0000-0000-0000-000000000000"}',
    json.dumps(
        {
            "schema_version": 1,
            "event_id": str(uuid.uuid4()),
            "occurred_at": "2025-01-01T00:00:00+00:00",
            "actor": "nul\u0000actor",
            "event_type": "ops_procedure",
            "action": "x",
        }
    ).encode(),
]


def test_malformed_events_never_stop_a_consumer(
    tmp_path: Path, database_url: str, redis_service: RedisService, run_daemons: Any
) -> None:
    config = write_config(tmp_path / "caracal.yaml", database_url, redis={"url": redis_service.url})
    daemons = run_daemons(config)
    agents = add_agents(database_url, 3)
    events = make_events(agents, 600)
    audits = [audit_event(n) for n in range(60)]
    producer = pg_log.PgLogProducer(database_url)
    try:
        for chunk in range(0, 600, 100):  # malformed records in between good ones, over several batches
            send_events(producer, [*events[chunk : chunk + 100], *((b"bad", v) for v in MALFORMED_METERING)])
            emit_audit(producer, audits[chunk // 10 : chunk // 10 + 10])
            for value in MALFORMED_AUDIT:
                producer.send(AUDIT_TOPIC, value, key=b"bad").result(30)
            time.sleep(0.2)
    finally:
        producer.close()
    for name in CONSUMERS:
        group, topic = GROUPS[name]
        wait_for(
            lambda g=group, t=topic: (
                event_log_committed(database_url, g, t) == event_log_end(database_url, t)
            ),
            what=f"{name} drained",
        )
    daemons.alive()
    assert all(daemons.ready(name) for name in CONSUMERS)
    check_ledger(database_url, events)
    check_audit(database_url, audits)
    check_aggregates(redis_service.url, events)
    letters = dead_letters(database_url)
    per_group: dict[str, int] = {}
    for d in letters:
        per_group[d["consumer_group"]] = per_group.get(d["consumer_group"], 0) + 1
    assert per_group == {
        "ledger-writer-group": 6 * len(MALFORMED_METERING),
        "metrics-aggregator-group": 6 * len(MALFORMED_METERING),
        "audit-logger-group": 6 * len(MALFORMED_AUDIT),
    }
    daemons.stop()


# --------------------------------------------------------------------------- kill -9


@dataclass
class KafkaSetup:
    config: dict[str, Any]
    caracal: Path
    metering: str
    audit: str
    dlq: str
    suffix: str

    def args(self, name: str) -> list[str]:
        topic = self.audit if name == "audit-logger" else self.metering
        return ["--topic", topic, "--group", f"{name}-{self.suffix}", "--dlq-topic", self.dlq]

    def committed(self, name: str) -> int:
        """What the group committed (-1 while the broker cannot say, e.g. just after a restart)."""
        topic = self.audit if name == "audit-logger" else self.metering
        try:
            return sum(committed_offsets(self.config, f"{name}-{self.suffix}", topic, timeout=10).values())
        except (BusError, TimeoutError):
            return -1


@pytest.fixture
def kafka_setup(
    tmp_path: Path, database_url: str, kafka_service: KafkaService, redis_service: RedisService
) -> KafkaSetup:
    config = {"bootstrap.servers": kafka_service.bootstrap_servers}
    suffix = uuid.uuid4().hex[:8]
    metering, audit, dlq = f"f.metering.{suffix}", f"f.audit.{suffix}", f"f.dlq.{suffix}"
    create_topics(config, [metering], partitions=4, replication_factor=1)
    create_topics(config, [audit, dlq], partitions=1, replication_factor=1)
    caracal = write_config(
        tmp_path / "caracal.yaml",
        database_url,
        bus={"kind": "kafka"},
        kafka={"bootstrap_servers": kafka_service.bootstrap_servers},
        redis={"url": redis_service.url},
    )
    return KafkaSetup(config, caracal, metering, audit, dlq, suffix)


def test_kill_9_of_a_ledger_writer_mid_stream_then_restart_is_exactly_once(
    database_url: str, kafka_setup: KafkaSetup, run_daemons: Any
) -> None:
    events = make_events(add_agents(database_url, 8), 20_000)
    producer = KafkaProducer(kafka_setup.config)
    try:
        send_events(producer, events, topic=kafka_setup.metering)
    finally:
        producer.close()
    extra = {"ledger-writer": [*kafka_setup.args("ledger-writer"), "--batch-size", "500"]}
    first = run_daemons(kafka_setup.caracal, ("ledger-writer",), extra)
    proc = first.procs["ledger-writer"]
    wait_for(lambda: ledger_count(database_url) >= 2000 or proc.poll() is not None, what="progress")
    first.alive()
    assert stop_daemon(proc, signal.SIGKILL) == -signal.SIGKILL
    written = ledger_count(database_url)
    assert 0 < written < len(events), "the kill should land mid-stream"
    kept, raw = totals_beside_raw(database_url)
    assert kept == raw  # the totals commit with their rows

    second = run_daemons(kafka_setup.caracal, ("ledger-writer",), extra)
    wait_for(
        lambda: kafka_setup.committed("ledger-writer") >= len(events),
        timeout=180,
        what="the restarted writer",
    )
    second.stop()
    check_ledger(database_url, events)


# --------------------------------------------------------------------------- a Kafka broker restart


def test_a_kafka_broker_restart_mid_stream_pauses_and_resumes_every_consumer(
    database_url: str,
    redis_service: RedisService,
    kafka_service: KafkaService,
    kafka_setup: KafkaSetup,
    run_daemons: Any,
) -> None:
    events = make_events(add_agents(database_url, 6), 6000)
    audits = [audit_event(n) for n in range(300)]
    daemons = run_daemons(
        kafka_setup.caracal, CONSUMERS, {name: kafka_setup.args(name) for name in CONSUMERS}
    )
    wait_for(lambda: all(daemons.ready(n) for n in CONSUMERS), what="every consumer ready")
    failures: list[BaseException] = []

    def produce() -> None:
        producer = KafkaProducer(kafka_setup.config, delivery_timeout=180)
        try:
            for chunk in range(0, 6000, 500):
                send_events(producer, events[chunk : chunk + 500], topic=kafka_setup.metering)
                emit_audit(producer, audits[chunk // 20 : chunk // 20 + 25], topic=kafka_setup.audit)
                time.sleep(0.3)
        except BaseException as exc:
            failures.append(exc)
        finally:
            producer.close()

    thread = threading.Thread(target=produce)
    thread.start()
    wait_for(lambda: ledger_count(database_url) >= 1000, what="progress before the restart")
    kafka_service.restart()
    wait_for(lambda: kafka_setup.committed("ledger-writer") >= 1, what="the broker back")
    thread.join(300)
    assert not thread.is_alive() and not failures, failures
    for name, total in (("ledger-writer", 6000), ("metrics-aggregator", 6000), ("audit-logger", 300)):
        wait_for(lambda n=name, t=total: kafka_setup.committed(n) >= t, timeout=180, what=f"{name} caught up")
    daemons.alive()
    wait_for(lambda: all(daemons.ready(n) for n in CONSUMERS), what="every consumer ready again")
    check_ledger(database_url, events)
    check_aggregates(redis_service.url, events)
    check_audit(database_url, audits)
    assert dead_letters(database_url) == []
    daemons.stop()


# --------------------------------------------------------------------------- PostgreSQL outages


def test_terminated_connections_pause_the_consumers_and_lose_or_duplicate_nothing(
    tmp_path: Path, database_url: str, redis_service: RedisService, run_daemons: Any
) -> None:
    config = write_config(tmp_path / "caracal.yaml", database_url, redis={"url": redis_service.url})
    # small batches: each transaction must fit between two kills
    daemons = run_daemons(config, CONSUMERS, {name: ["--batch-size", "200"] for name in CONSUMERS})
    agents = add_agents(database_url, 4)
    events = make_events(agents, 4000)
    audits = [audit_event(n) for n in range(200)]
    stop = threading.Event()
    kills = 0

    def killer() -> None:
        nonlocal kills
        with psycopg.connect(database_url, autocommit=True) as conn:
            while not stop.wait(0.5):
                row = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name LIKE 'caracal-consumer%%' OR application_name LIKE 'caracal-ledger%%' "
                    "OR application_name LIKE 'caracal-audit-logger%%' "
                    "OR application_name LIKE 'caracal-metrics-aggregator%%'"
                ).fetchone()
                kills += int(row[0]) if row else 0

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        producer = pg_log.PgLogProducer(database_url)
        try:
            for chunk in range(0, 4000, 500):
                send_events(producer, events[chunk : chunk + 500])
                emit_audit(producer, audits[chunk // 20 : chunk // 20 + 25])
                time.sleep(0.2)
        finally:
            producer.close()
        wait_for(lambda: ledger_count(database_url) >= 2000, timeout=120, what="progress under fire")
    finally:
        stop.set()
        thread.join(10)
    assert kills > 0
    for name in CONSUMERS:
        group, topic = GROUPS[name]
        wait_for(
            lambda g=group, t=topic: (
                event_log_committed(database_url, g, t) == event_log_end(database_url, t)
            ),
            timeout=120,
            what=f"{name} drained",
        )
    daemons.alive()
    wait_for(lambda: all(daemons.ready(n) for n in CONSUMERS), what="ready again")
    check_ledger(database_url, events)
    check_audit(database_url, audits)
    check_aggregates(redis_service.url, events)
    daemons.stop()


def test_a_database_renamed_away_and_back(
    tmp_path: Path, database_url: str, postgres_service: PostgresService, run_daemons: Any
) -> None:
    config = write_config(tmp_path / "caracal.yaml", database_url)
    names = ("ledger-writer", "audit-logger")
    daemons = run_daemons(config, names)
    agents = add_agents(database_url, 2)
    before, after = make_events(agents, 500), make_events(agents, 500, start=500)
    producer = pg_log.PgLogProducer(database_url)
    try:
        send_events(producer, before)
    finally:
        producer.close()
    wait_for(lambda: ledger_count(database_url) == 500, what="the first half")
    wait_for(lambda: all(daemons.ready(n) for n in names), what="ready")

    name = database_url.split("?")[0].rsplit("/", 1)[1]
    away = f"{name}_away"
    with postgres_service.connect() as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        for _ in range(50):
            try:
                admin.execute(f'ALTER DATABASE "{name}" RENAME TO "{away}"')
                break
            except psycopg.errors.ObjectInUse:
                time.sleep(0.1)
        else:
            pytest.fail("cannot rename the database")
        try:
            wait_for(lambda: not any(daemons.ready(n) for n in names), what="not ready while it is away")
            time.sleep(2)  # several failed reconnections
            daemons.alive()
        finally:
            admin.execute(f'ALTER DATABASE "{away}" RENAME TO "{name}"')
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    producer = pg_log.PgLogProducer(database_url)
    try:
        send_events(producer, after)
        emit_audit(producer, [audit_event(1)])
    finally:
        producer.close()
    wait_for(lambda: ledger_count(database_url) == 1000, timeout=120, what="the second half after the outage")
    wait_for(lambda: len(rows(database_url, "SELECT 1 FROM audit_log")) == 1, what="the audit event")
    wait_for(lambda: all(daemons.ready(n) for n in names), what="ready again")
    check_ledger(database_url, [*before, *after])
    daemons.stop()
