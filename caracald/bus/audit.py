"""Emitting audit events to ``caracal.audit.events``, for the audit logger to append to the audit log.

In the distributed deployment the gateway and the ops procedures record what they do as audit events on the
bus (Kafka, or the event log when the bus is PostgreSQL); the audit logger (``caracald audit-logger``)
appends them to the hash-chained ``audit_log``, each event id once. Administrative changes made through the
CLI keep writing their audit record directly, in the transaction of the change: that is stronger (the change
and its record commit together) and needs no bus.

::

    emitter = AuditEmitter.for_config(config)            # Kafka or the event log, per bus.kind
    emitter.emit(AuditEntry(now, "gateway", AuditEventType.OPS_PROCEDURE, "deny_all.enabled", ...))
    await emitter.emit_async(entry)                      # from an event loop
    sink = BusAuditSink(emitter, actor="alice")          # a procedure's audit sink
    emitter.close()

:meth:`AuditEmitter.emit` returns once the bus has the event durably (or raises
:class:`~caracald.bus.base.BusUnavailableError`); retrying a failed emit with the same
:class:`~caracald.core.audit.AuditEvent` cannot append it twice.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from datetime import datetime
from typing import Any

from caracald.bus.base import (
    HEADER_EVENT_ID,
    HEADER_KIND,
    HEADER_SCHEMA_VERSION,
    BusUnavailableError,
    RecordProducer,
)
from caracald.core.audit import AUDIT_SCHEMA_VERSION, AuditEntry, AuditEvent, AuditEventType, encode_event
from caracald.core.events import AUDIT_TOPIC
from caracald.runtime.config import CaracalConfig


def audit_headers(event: AuditEvent) -> list[tuple[str, bytes]]:
    return [
        (HEADER_EVENT_ID, str(event.event_id).encode()),
        (HEADER_SCHEMA_VERSION, str(AUDIT_SCHEMA_VERSION).encode()),
        (HEADER_KIND, f"audit:{event.entry.event_type}".encode()),
    ]


class AuditEmitter:
    """Sends audit events to the audit topic through ``producer`` (which it owns and closes)."""

    def __init__(self, producer: RecordProducer, *, topic: str = AUDIT_TOPIC, timeout: float = 30.0) -> None:
        self.producer = producer
        self.topic = topic
        self.timeout = timeout

    @classmethod
    def for_config(cls, config: CaracalConfig, database_url: str | None = None) -> AuditEmitter:
        """On Kafka with ``bus.kind: kafka``, else on the event log of ``database_url`` (default: the
        configured database)."""
        if config.bus.kind == "kafka":
            from caracald.bus.kafka import KafkaProducer, client_config

            return cls(KafkaProducer(client_config(config.kafka)))
        from caracald.bus.pg_log import PgLogProducer

        if database_url is None:
            from caracald.store.connect import resolve_url

            database_url = resolve_url(config)
        return cls(PgLogProducer(database_url, application_name="caracal-audit-emitter"))

    def send(self, event: AuditEvent) -> Future[None]:
        return self.producer.send(
            self.topic, encode_event(event), key=event.key, headers=audit_headers(event)
        )

    def emit(self, entry: AuditEntry | AuditEvent) -> AuditEvent:
        """Send one event and wait until the bus has it; returns the event (with its id)."""
        event = entry if isinstance(entry, AuditEvent) else AuditEvent.new(entry)
        try:
            self.send(event).result(timeout=self.timeout)
        except TimeoutError:
            raise BusUnavailableError(
                f"the bus did not acknowledge the audit event within {self.timeout:g} s"
            ) from None
        return event

    async def emit_async(self, entry: AuditEntry | AuditEvent) -> AuditEvent:
        event = entry if isinstance(entry, AuditEvent) else AuditEvent.new(entry)
        try:
            await asyncio.wait_for(asyncio.wrap_future(self.send(event)), self.timeout)
        except TimeoutError:
            raise BusUnavailableError(
                f"the bus did not acknowledge the audit event within {self.timeout:g} s"
            ) from None
        return event

    def flush(self, timeout: float = 30.0) -> int:
        return self.producer.flush(timeout)

    def close(self) -> None:
        self.producer.close()


class BusAuditSink:
    """A procedure's audit sink (``caracal_ops.procedures.framework.AuditSink``) over the bus: each record
    becomes an ``ops_procedure`` audit event, appended by the audit logger."""

    def __init__(
        self, emitter: AuditEmitter, actor: str, *, event_type: AuditEventType = AuditEventType.OPS_PROCEDURE
    ) -> None:
        self.emitter = emitter
        self.actor = actor
        self.event_type = event_type

    def record(
        self, *, action: str, at: datetime, subject_id: str, reason: str | None, details: dict[str, Any]
    ) -> None:
        self.emitter.emit(
            AuditEntry(
                occurred_at=at,
                actor=self.actor,
                event_type=self.event_type,
                action=action,
                subject_id=subject_id,
                reason=reason,
                details=details,
            )
        )
