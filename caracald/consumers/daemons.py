"""Building the consumers from the configuration, for ``caracald <consumer>`` and for ``caracald up``.

=====================  =========================  ============================  ==============================
consumer               group                      topic                         writes
=====================  =========================  ============================  ==============================
``ledger-writer``      ``ledger-writer-group``    ``caracal.metering.events``   the ledger (and its totals)
``metrics-aggregator`` ``metrics-aggregator-...`` ``caracal.metering.events``   Redis aggregates, Prometheus
``audit-logger``       ``audit-logger-group``     ``caracal.audit.events``      the hash-chained audit log
=====================  =========================  ============================  ==============================

On ``bus.kind: kafka`` they read Kafka; on ``postgres`` (the embedded default) the event log, with the same
code. Dead letters go to ``dlq_events`` and ``caracal.dlq`` on the same bus.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from caracald.consumers import audit_logger, ledger_writer, metrics_aggregator
from caracald.consumers.sealing import PeriodicSealer
from caracald.core.events import AUDIT_TOPIC, DLQ_TOPIC, METERING_TOPIC
from caracald.runtime.config import CaracalConfig
from caracald.runtime.daemon import ConsumerLoop

Kind = Literal["ledger-writer", "metrics-aggregator", "audit-logger"]
KINDS: Final[tuple[Kind, ...]] = ("ledger-writer", "metrics-aggregator", "audit-logger")

#: Each consumer's group and topic.
DEFAULTS: Final[dict[str, tuple[str, str]]] = {
    "ledger-writer": (ledger_writer.GROUP, METERING_TOPIC),
    "metrics-aggregator": (metrics_aggregator.GROUP, METERING_TOPIC),
    "audit-logger": (audit_logger.GROUP, AUDIT_TOPIC),
}

_log = logging.getLogger(__name__)


@dataclass
class Built:
    kind: Kind
    loop: ConsumerLoop
    _close: Callable[[], None]
    bus: str
    group: str
    topic: str
    #: The ledger writer's periodic sealing (see caracald.consumers.sealing), started by :meth:`start_extras`.
    sealer: PeriodicSealer | None = None

    def start_extras(self) -> None:
        if self.sealer is not None:
            self.sealer.start()

    def close(self) -> None:
        try:
            if self.sealer is not None:
                self.sealer.stop()
        finally:
            self._close()


def kafka_settings(config: CaracalConfig) -> dict[str, Any] | None:
    if config.bus.kind != "kafka":
        return None
    from caracald.bus.kafka import client_config

    return client_config(config.kafka)


def build(
    kind: Kind,
    config: CaracalConfig,
    database_url: str,
    *,
    group: str | None = None,
    topic: str | None = None,
    dlq_topic: str = DLQ_TOPIC,
    batch_size: int | None = None,
    seal: bool = True,
    **options: Any,
) -> Built:
    """The consumer ``kind`` per ``config`` (its bus, Kafka settings, Redis), reading ``database_url``.

    The ledger writer also seals its events into Merkle batches (``seal``; see
    :mod:`caracald.consumers.sealing`), once :meth:`Built.start_extras` is called.
    """
    default_group, default_topic = DEFAULTS[kind]
    group = group or default_group
    topic = topic or default_topic
    bus = config.bus.kind
    kafka = kafka_settings(config)
    common: dict[str, Any] = {
        "kafka_config": kafka,
        "topic": topic,
        "group": group,
        "dlq_topic": dlq_topic,
        "connect_timeout": config.database.connect_timeout_seconds,
        **options,
    }
    if kind == "ledger-writer":
        writer = ledger_writer.build(
            bus,
            database_url,
            batch_size=batch_size or 5000,
            statement_timeout_ms=config.database.statement_timeout_ms,
            seal_batch_size=config.integrity.batch_size,
            **common,
        )

        def close_writer() -> None:
            try:
                writer.close()
            finally:
                writer.dlq_producer.close()

        sealer = PeriodicSealer.for_config(config, database_url) if seal else None
        return Built(kind, writer, close_writer, bus, group, topic, sealer)
    if kind == "audit-logger":
        logger = audit_logger.build(
            bus,
            database_url,
            batch_size=batch_size or 500,
            statement_timeout_ms=config.database.statement_timeout_ms,
            **common,
        )
        return Built(kind, logger, logger.close, bus, group, topic)
    if kind == "metrics-aggregator":
        if config.redis.url is None:
            _log.warning(
                "no Redis configured (redis.url): the metrics aggregator keeps its Prometheus counters only"
            )
        aggregator = metrics_aggregator.build(
            bus,
            database_url,
            config.redis.url.get_secret_value() if config.redis.url else None,
            batch_size=batch_size or 500,
            **common,
        )
        return Built(kind, aggregator, aggregator.close, bus, group, topic)
    raise ValueError(f"unknown consumer {kind!r}")


class InProcessConsumers:
    """The consumers of the embedded deployment (``caracald up``), each on a thread of this process.

    The ledger writer and the audit logger always run; the metrics aggregator when Redis is configured.
    They read the bus the gateway writes to (the event log by default), as the distributed daemons do.
    """

    def __init__(self, config: CaracalConfig, database_url: str, *, kinds: tuple[Kind, ...] | None = None):
        if kinds is None:
            wanted: tuple[Kind, ...] = ("ledger-writer", "audit-logger")
            if config.redis.url is not None:
                wanted += ("metrics-aggregator",)
        else:
            wanted = kinds
        self.config = config
        self.database_url = database_url
        self.consumers = [build(kind, config, database_url) for kind in wanted]
        self._threads: list[threading.Thread] = []
        self.errors: dict[str, BaseException] = {}

    def start(self) -> InProcessConsumers:
        for built in self.consumers:
            built.start_extras()
            thread = threading.Thread(
                target=self._run, args=(built,), name=f"caracal-{built.kind}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self, built: Built) -> None:
        try:
            built.loop.run()
        except BaseException as exc:  # reported by stop(); the gateway goes on serving meanwhile
            _log.exception("the in-process %s failed", built.kind)
            self.errors[built.kind] = exc

    def get(self, kind: Kind) -> ConsumerLoop:
        for built in self.consumers:
            if built.kind == kind:
                return built.loop
        raise KeyError(kind)

    def wait_caught_up(self, timeout: float) -> bool:
        """Wait until the ledger writer committed every metering event that was on the event log when
        called (so counters seeded from the ledger next see them); False after ``timeout``."""
        if self.config.bus.kind != "postgres":
            return True
        import psycopg

        from caracald.bus import pg_log

        deadline = time.monotonic() + timeout
        group, topic = DEFAULTS["ledger-writer"]
        try:
            with psycopg.connect(self.database_url, autocommit=True) as conn:
                end = pg_log.end_offset(conn, topic)
                while True:
                    if pg_log.committed_offsets(conn, group).get((topic, 0), 0) >= end:
                        return True
                    if time.monotonic() >= deadline or self.errors:
                        return False
                    time.sleep(0.05)
        except psycopg.Error as exc:
            _log.warning("cannot tell whether the ledger writer caught up: %s", exc)
            return False

    def stop(self, timeout: float = 60.0) -> None:
        """Stop every consumer (each finishes and commits its batch), then close them."""
        for built in self.consumers:
            built.loop.stop()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.1))
        for built in self.consumers:
            try:
                built.close()
            except Exception:
                _log.exception("closing the in-process %s", built.kind)
