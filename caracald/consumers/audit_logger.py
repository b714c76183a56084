"""The audit logger: audit events from ``caracal.audit.events`` into the hash-chained ``audit_log``.

Group ``audit-logger-group``, on Kafka or the event log, through
:class:`~caracald.consumers.runner.ConsumerRunner`. Each batch is appended in one transaction under the
chain's lock (:func:`caracald.store.audit.append_events`), in the order the events were consumed; an event
whose id is already in the log (a redelivery after a crash, a replay) is skipped, so the log holds each
event once. A record that is not an audit event is a dead letter; a PostgreSQL outage pauses the logger
until it ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import psycopg
from psycopg.rows import dict_row

from caracald.bus.base import BatchConsumer, BusError, Record, RecordProducer
from caracald.consumers import metrics
from caracald.consumers.ledger_writer import Failure, classify
from caracald.consumers.runner import Applied, ConsumerRunner, DeadLetterStore
from caracald.core.audit import AuditEvent, decode_event
from caracald.core.events import AUDIT_TOPIC, DLQ_TOPIC
from caracald.store import audit as audit_store

GROUP: Final = "audit-logger-group"


class AuditLogProcessor:
    """Appends audit events to the audit log of ``database_url`` (a connection of its own)."""

    def __init__(
        self, database_url: str, *, connect_timeout: int = 5, statement_timeout_ms: int = 30_000
    ) -> None:
        self.database_url = database_url
        self.connect_timeout = connect_timeout
        self.statement_timeout_ms = statement_timeout_ms
        self._conn: psycopg.Connection[dict[str, Any]] | None = None

    def _connection(self) -> psycopg.Connection[dict[str, Any]]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.database_url,
                autocommit=True,
                row_factory=dict_row,
                connect_timeout=self.connect_timeout,
                application_name="caracal-audit-logger",
                options=f"-c statement_timeout={self.statement_timeout_ms} -c synchronous_commit=on",
            )
        return self._conn

    def decode(self, record: Record) -> AuditEvent:
        return decode_event(record.value)

    def apply(self, items: Sequence[tuple[Record, AuditEvent]]) -> Applied:
        events = [event for _, event in items]
        try:
            conn = self._connection()
            with metrics.database_query("audit_append"), conn.transaction():
                appended = audit_store.append_events(conn, events)
        except psycopg.Error:
            if self._conn is not None and (self._conn.closed or self._conn.broken):
                self._drop()
            raise
        return Applied(len(appended), len(events) - len(appended))

    def apply_one(self, record: Record, item: AuditEvent) -> Applied:
        return self.apply([(record, item)])

    def classify(self, exc: BaseException) -> Failure:
        if isinstance(exc, ValueError | TypeError | ArithmeticError | RecursionError) or (
            isinstance(exc, psycopg.DataError | psycopg.ProgrammingError) and exc.sqlstate is None
        ):
            return Failure.PERMANENT  # raised before it reached the server (hashing, the client library)
        failure = classify(exc, self._conn)
        if failure is Failure.OUTAGE:
            self._drop()
        return failure

    def check(self) -> None:
        try:
            self._connection().execute("SELECT 1")
        except psycopg.Error:
            self._drop()
            raise

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def close(self) -> None:
        self._drop()


AuditLogger = ConsumerRunner[AuditEvent]


def build(
    bus: str,
    database_url: str,
    *,
    kafka_config: dict[str, Any] | None = None,
    topic: str = AUDIT_TOPIC,
    group: str = GROUP,
    dlq_topic: str = DLQ_TOPIC,
    connect_timeout: int = 5,
    statement_timeout_ms: int = 30_000,
    **runner_options: Any,
) -> AuditLogger:
    """An audit logger on the ``kafka`` or ``postgres`` (event log) bus."""
    consumer: BatchConsumer
    producer: RecordProducer
    if bus == "kafka":
        from caracald.bus.kafka import KafkaBatchConsumer, KafkaProducer

        if not kafka_config:
            raise BusError("the Kafka bus needs kafka.bootstrap_servers")
        consumer = KafkaBatchConsumer(kafka_config, group, [topic])
        producer = KafkaProducer(kafka_config)
    elif bus == "postgres":
        from caracald.bus.pg_log import PgLogConsumer, PgLogProducer

        consumer = PgLogConsumer(database_url, group, [topic])
        producer = PgLogProducer(database_url, application_name="caracal-audit-logger-dlq")
    else:
        raise ValueError(f"unknown bus {bus!r}")
    processor = AuditLogProcessor(
        database_url, connect_timeout=connect_timeout, statement_timeout_ms=statement_timeout_ms
    )
    return ConsumerRunner(
        consumer,
        processor,
        dead_letters=DeadLetterStore(
            database_url, connect_timeout=connect_timeout, application_name="caracal-audit-logger-dlq"
        ),
        dlq_producer=producer,
        dlq_topic=dlq_topic,
        **runner_options,
    )
