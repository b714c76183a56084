"""The consume loop shared by the metrics aggregator and the audit logger.

The ledger writer has its own, pipelined loop (:mod:`caracald.consumers.ledger_writer`); the other consumers
are lighter and share this one. A :class:`Processor` says how to decode a record and how to apply a batch
(idempotently: every batch may be applied again after a crash); :class:`ConsumerRunner` does the rest, on
either bus:

1. poll a batch;
2. decode each record; what cannot be decoded is a dead letter (a malformed event never stops a consumer);
3. apply the batch. On failure the processor's :meth:`Processor.classify` decides:

   * ``OUTAGE`` (a dependency is away: PostgreSQL, Redis): keep the batch, report not ready, retry with
     capped exponential backoff, without limit and without polling, until it applies;
   * ``TRANSIENT`` (deadlock, serialization failure, timeout): the same, counted, and logged louder after
     ``max_retries``;
   * ``PERMANENT`` (some record is unacceptable): apply the records one at a time
     (:meth:`Processor.apply_one`); the ones that still fail become dead letters;

4. record the dead letters in ``dlq_events`` (PostgreSQL) and publish them to ``caracal.dlq``;
5. commit the offsets, only now.

A crash anywhere replays the batch from the last committed offset, which changes nothing. ``stop()`` (SIGTERM)
lets the batch in hand finish and commit; a stop during an outage abandons it uncommitted.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any, Generic, Protocol, TypeVar

import psycopg

from caracald.bus.base import (
    BatchConsumer,
    BusError,
    BusUnavailableError,
    CommitFailedError,
    Record,
    RecordProducer,
)
from caracald.consumers import dlq, metrics
from caracald.consumers.ledger_writer import Abandoned, Backoff, Failure, Health, classify
from caracald.core.errors import CaracalError
from caracald.core.events import DLQ_TOPIC, EventDecodeError
from caracald.store import dlq as dlq_store
from caracald.store.dlq import DeadLetter

_log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Applied:
    """What applying a batch did: events newly applied, events seen before, records rejected."""

    applied: int = 0
    duplicates: int = 0
    rejected: list[DeadLetter] = field(default_factory=list)


class Processor(Protocol[T]):
    """How one consumer decodes and applies records (see the module doc)."""

    def decode(self, record: Record) -> T:
        """The record's event; raises :class:`~caracald.core.events.EventDecodeError` when it is none."""
        ...

    def apply(self, items: Sequence[tuple[Record, T]]) -> Applied:
        """Apply the events, idempotently (each may have been applied before)."""
        ...

    def apply_one(self, record: Record, item: T) -> Applied:
        """Apply one event alone (isolating a permanent failure); raise when it cannot be."""
        ...

    def classify(self, exc: BaseException) -> Failure:
        """How to treat a failure of :meth:`apply`."""
        ...

    def check(self) -> None:
        """Raise when the processor's dependencies are not reachable (run at start and while idle)."""
        ...

    def close(self) -> None: ...


class DeadLetterStore:
    """Dead letters into ``dlq_events``, on a connection of its own (opened when first needed)."""

    def __init__(
        self, url: str, *, connect_timeout: int = 5, application_name: str = "caracal-consumer"
    ) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self.application_name = application_name
        self._conn: psycopg.Connection[Any] | None = None

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=self.connect_timeout,
                application_name=self.application_name,
                options="-c synchronous_commit=on",
            )
        return self._conn

    def insert(self, letters: Sequence[DeadLetter]) -> int:
        try:
            conn = self._connection()
            with metrics.database_query("dlq_insert"), conn.transaction():
                return dlq_store.insert(conn, letters)
        except psycopg.Error:
            self.close()
            raise

    def stats(self) -> dlq_store.DeadLetterStats:
        try:
            conn = self._connection()
            with metrics.database_query("dlq_stats"):
                return dlq_store.stats(conn)
        except psycopg.Error:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


@dataclass(frozen=True, slots=True)
class Outcome:
    records: int
    applied: int
    duplicates: int
    dead_lettered: int


class ConsumerRunner(Generic[T]):
    """Runs ``processor`` over ``consumer``'s records until :meth:`stop`; see the module doc."""

    def __init__(
        self,
        consumer: BatchConsumer,
        processor: Processor[T],
        *,
        dead_letters: DeadLetterStore,
        dlq_producer: RecordProducer,
        dlq_topic: str = DLQ_TOPIC,
        batch_size: int = 500,
        poll_timeout: float = 0.5,
        max_retries: int = 3,
        backoff: Backoff | None = None,
        dlq_timeout: float = 30.0,
        lag_interval: float = 5.0,
        check_interval: float = 15.0,
    ) -> None:
        self.consumer = consumer
        self.group = consumer.group
        self.processor = processor
        self.dead_letters = dead_letters
        self.dlq_producer = dlq_producer
        self.dlq_topic = dlq_topic
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self.max_retries = max_retries
        self.backoff = backoff or Backoff()
        self.dlq_timeout = dlq_timeout
        self.lag_interval = lag_interval
        self.check_interval = check_interval
        self.health = Health()
        #: Called on every turn of the loop (also while it waits out an outage): the daemon feeds systemd's
        #: watchdog from it.
        self.on_beat: Callable[[], None] | None = None
        self._stop = threading.Event()
        self._next_lag = 0.0
        self._next_check = 0.0
        self._lag_stale = False
        self._dependency_ok = False

    # -- control

    def stop(self) -> None:
        """Finish the batch in hand, commit it and leave :meth:`run` (safe from a signal handler)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            _log.info("signal %d: finishing the current batch, then stopping", signum)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def close(self) -> None:
        """Leave the group and release every connection (the DLQ producer included)."""
        self.consumer.close()
        self.processor.close()
        self.dead_letters.close()
        self.dlq_producer.close()

    def _set_ready(self, ready: bool, error: str | None = None) -> None:
        self.health.ready = ready
        if error is not None:
            self.health.last_error = error
        metrics.CONSUMER_READY.labels(self.group).set(1 if ready else 0)

    def _beat(self) -> None:
        self.health.last_heartbeat = time.time()
        if self.on_beat is not None:
            self.on_beat()

    def _wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self._beat()
            if self._stop.is_set():
                raise Abandoned("stopped while retrying")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._stop.wait(min(remaining, 1.0))

    # -- the loop

    def run(self, *, max_batches: int | None = None, idle_exit: float | None = None) -> None:
        try:
            self._await_dependencies()
        except Abandoned:
            return
        batches = 0
        failures = 0
        idle_since = time.monotonic()
        while not self._stop.is_set():
            self._beat()
            try:
                records = self.consumer.poll_batch(self.batch_size, self.poll_timeout)
            except BusError as exc:
                metrics.CONSUMER_ERRORS.labels(self.group, type(exc).__name__).inc()
                self._set_ready(False, f"bus: {exc}")
                _log.warning("cannot poll the bus: %s", exc)
                try:
                    self._wait(self.backoff.delay(failures))
                except Abandoned:
                    return
                failures += 1
                continue
            failures = 0
            self.health.last_poll = time.time()
            if not self.health.ready and self._dependency_ok:
                self._set_ready(True)
            if records:
                try:
                    self.process(records)
                except Abandoned:
                    _log.warning(
                        "stopped with a batch of %d records not applied; it will be read again", len(records)
                    )
                    return
                batches += 1
                idle_since = time.monotonic()
                if max_batches is not None and batches >= max_batches:
                    return
            else:
                if idle_exit is not None and time.monotonic() - idle_since >= idle_exit:
                    return
                self._idle_check()
            self._periodic(idle=not records)

    def process(self, records: Sequence[Record]) -> Outcome:
        """Decode, apply, dead-letter and commit one batch (raises :class:`Abandoned` when stopped)."""
        started = time.perf_counter()
        items: list[tuple[Record, T]] = []
        letters: list[DeadLetter] = []
        for record in records:
            try:
                items.append((record, self.processor.decode(record)))
            except EventDecodeError as exc:
                letters.append(self._letter(record, exc))
            except Exception as exc:  # a decoder must never take the consumer down
                letters.append(self._letter(record, EventDecodeError(f"malformed event: {exc!r}")))
        applied = self._apply(items) if items else Applied()
        letters += applied.rejected
        if letters:
            self._store_letters(letters)
            self._publish(letters)
            _log.warning("%d of %d records dead-lettered", len(letters), len(records))
        self._commit(records)
        metrics.CONSUMER_RECORDS.labels(self.group, "applied").inc(applied.applied)
        metrics.CONSUMER_RECORDS.labels(self.group, "duplicate").inc(applied.duplicates)
        metrics.CONSUMER_RECORDS.labels(self.group, "dead_lettered").inc(len(letters))
        metrics.MESSAGE_PROCESSING_DURATION.labels(self.group).observe(time.perf_counter() - started)
        return Outcome(len(records), applied.applied, applied.duplicates, len(letters))

    def _letter(self, record: Record, exc: BaseException, retry_count: int = 0) -> DeadLetter:
        metrics.CONSUMER_ERRORS.labels(self.group, type(exc).__name__).inc()
        return dlq.dead_letter(
            record,
            group=self.group,
            error_type=type(exc).__name__,
            error_message=_describe(exc),
            retry_count=retry_count,
        )

    def _apply(self, items: list[tuple[Record, T]]) -> Applied:
        attempt = 0
        while True:
            self._beat()
            try:
                result = self.processor.apply(items)
            except Exception as exc:
                failure = self.processor.classify(exc)
                metrics.CONSUMER_ERRORS.labels(self.group, type(exc).__name__).inc()
                if failure is Failure.PERMANENT:
                    return self._isolate(items, attempt)
                self._set_ready(False, _describe(exc))
                self._dependency_ok = False
                if attempt == 0 or (failure is Failure.TRANSIENT and attempt == self.max_retries):
                    _log.error("cannot apply a batch of %d (%s); retrying", len(items), _describe(exc))
                self._wait(self.backoff.delay(attempt))
                attempt += 1
                continue
            if not self.health.ready:
                self._dependency_ok = True
                self._set_ready(True)
                if attempt:
                    _log.info("applied the batch after %d retries", attempt)
            return result

    def _isolate(self, items: list[tuple[Record, T]], retries: int) -> Applied:
        """Apply one record at a time; the ones that fail for good become dead letters."""
        applied = duplicates = 0
        rejected: list[DeadLetter] = []
        for record, item in items:
            attempt = 0
            while True:
                self._beat()
                try:
                    one = self.processor.apply_one(record, item)
                except Exception as exc:
                    failure = self.processor.classify(exc)
                    if failure is Failure.PERMANENT:
                        rejected.append(self._letter(record, exc, retries))
                        break
                    metrics.CONSUMER_ERRORS.labels(self.group, type(exc).__name__).inc()
                    self._set_ready(False, _describe(exc))
                    self._wait(self.backoff.delay(attempt))
                    attempt += 1
                    continue
                applied += one.applied
                duplicates += one.duplicates
                rejected += one.rejected
                break
        return Applied(applied, duplicates, rejected)

    def _store_letters(self, letters: list[DeadLetter]) -> None:
        attempt = 0
        while True:
            self._beat()
            try:
                self.dead_letters.insert(letters)
                return
            except (psycopg.Error, OSError) as exc:
                metrics.CONSUMER_ERRORS.labels(self.group, type(exc).__name__).inc()
                if classify(exc) is Failure.PERMANENT:
                    _log.error("cannot record %d dead letter(s) in dlq_events: %s", len(letters), exc)
                    return  # the DLQ topic still gets them
                self._set_ready(False, f"PostgreSQL: {_describe(exc)}")
                if attempt == 0:
                    _log.error("cannot record dead letters (%s); retrying", _describe(exc))
                self._wait(self.backoff.delay(attempt))
                attempt += 1

    def _publish(self, letters: list[DeadLetter]) -> None:
        attempt = 0
        while True:
            try:
                dlq.publish(self.dlq_producer, letters, topic=self.dlq_topic, timeout=self.dlq_timeout)
                return
            except BusUnavailableError as exc:
                metrics.CONSUMER_ERRORS.labels(self.group, "DlqPublishError").inc()
                _log.warning("cannot publish %d dead letter(s) yet: %s", len(letters), exc)
                self._wait(self.backoff.delay(attempt))
                attempt += 1
            except BusError as exc:
                metrics.CONSUMER_ERRORS.labels(self.group, "DlqPublishError").inc()
                _log.error("the DLQ topic refused dead letters (kept in dlq_events): %s", exc)
                return

    def _commit(self, records: Sequence[Record]) -> None:
        try:
            self.consumer.commit(records)
        except (CommitFailedError, BusError) as exc:
            metrics.CONSUMER_ERRORS.labels(self.group, "CommitFailedError").inc()
            _log.warning("offsets not committed (the records will be read again): %s", exc)
            return
        self.health.last_commit = time.time()
        self._lag_stale = True

    # -- dependencies and periodic reports

    def _await_dependencies(self) -> None:
        attempt = 0
        while True:
            self._beat()
            try:
                self.processor.check()
                self._dependency_ok = True
                return
            except Exception as exc:
                self._set_ready(False, _describe(exc))
                if attempt == 0:
                    _log.error("dependencies unavailable (%s); retrying", _describe(exc))
                self._wait(self.backoff.delay(attempt))
                attempt += 1

    def _idle_check(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.check_interval
        try:
            self.processor.check()
        except Exception as exc:
            if self.health.ready:
                _log.warning("dependency check failed: %s", _describe(exc))
            self._dependency_ok = False
            self._set_ready(False, _describe(exc))
            self._next_check = now + min(self.check_interval, 1.0)
            return
        self._dependency_ok = True
        if not self.health.ready:
            self._set_ready(True)
        try:  # the DLQ gauges; PostgreSQL being away here is reported when a dead letter must be written
            stats = self.dead_letters.stats()
        except (psycopg.Error, OSError) as exc:
            _log.debug("cannot read the DLQ statistics: %s", exc)
            return
        age = (datetime.now(UTC) - stats.oldest_failed_at).total_seconds() if stats.oldest_failed_at else None
        metrics.report_dlq(stats.pending, age)

    def _periodic(self, *, idle: bool) -> None:
        now = time.monotonic()
        if now >= self._next_lag or (idle and self._lag_stale):
            self._next_lag = now + self.lag_interval
            self._lag_stale = False
            try:
                metrics.report_lag(self.group, self.consumer.lag())
            except (BusError, psycopg.Error) as exc:
                _log.debug("cannot read the consumer lag: %s", exc)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CaracalError):
        return exc.message
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
