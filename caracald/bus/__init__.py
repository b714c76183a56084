"""The event bus: Kafka (distributed) or an event-log table in PostgreSQL (embedded), and a local spool.

* :mod:`caracald.bus.base` -- :class:`Record`, the :class:`BatchConsumer`, :class:`RecordProducer` and
  :class:`EventSink` protocols, :class:`ProducerSink`, errors;
* :mod:`caracald.bus.pg_log` -- the event log: :class:`~caracald.bus.pg_log.PgLogProducer`,
  :class:`~caracald.bus.pg_log.PgLogConsumer`;
* :mod:`caracald.bus.kafka` -- :class:`~caracald.bus.kafka.KafkaProducer`,
  :class:`~caracald.bus.kafka.KafkaBatchConsumer`, :func:`~caracald.bus.kafka.create_topics`;
* :mod:`caracald.bus.spool` -- :class:`~caracald.bus.spool.Spool`,
  :class:`~caracald.bus.spool.SpoolForwarder`, :class:`~caracald.bus.spool.SpoolingSink`.

The implementations are imported from their modules, so that using one bus never loads the other's client.
"""

from caracald.bus.base import (
    BatchConsumer,
    BusError,
    BusUnavailableError,
    CommitFailedError,
    DeliveryError,
    EventSink,
    ProducerSink,
    Record,
    RecordProducer,
    event_headers,
    next_offsets,
)

__all__ = [
    "BatchConsumer",
    "BusError",
    "BusUnavailableError",
    "CommitFailedError",
    "DeliveryError",
    "EventSink",
    "ProducerSink",
    "Record",
    "RecordProducer",
    "event_headers",
    "next_offsets",
]
