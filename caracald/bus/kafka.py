"""Kafka: an idempotent producer, a batch consumer with manual commits, and topic administration.

The producer sends with ``acks=all`` and ``enable.idempotence=true`` (no duplicates or reordering from its own
retries); a record's future resolves when the in-sync replicas have it. Delivery reports are served by a
background thread, so ``await``-ing a send never blocks an event loop.

The consumer commits only what it was told was applied: :meth:`KafkaBatchConsumer.commit`, called after a
batch is applied, *stores* its offsets (``enable.auto.offset.store=false``: nothing else is ever stored) and
asks for an asynchronous commit of them at once; librdkafka's committer (``enable.auto.commit``, every second)
commits the stored offsets again until one succeeds, on a rebalance and on close. A synchronous commit is
not used: during a broker restart it can wait forever for a coordinator (seen in the fault tests), which
would stop the consumer and its watchdog pings. It reads only committed transactional data
(``isolation.level=read_committed``). librdkafka reports some conditions as messages carrying an error; here
partition EOFs are skipped, transient errors are logged (and raised as
:class:`~caracald.bus.base.BusUnavailableError` when no record came with them), and fatal or configuration
errors are raised as :class:`~caracald.bus.base.BusError`. A batch that holds records is never dropped because
an error came with it: the consumer's position has already moved past them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any, Final

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from caracald.bus.base import (
    BusError,
    BusUnavailableError,
    CommitFailedError,
    DeliveryError,
    Headers,
    Record,
    next_offsets,
)
from caracald.core.events import AUDIT_TOPIC, DLQ_TOPIC, METERING_TOPIC
from caracald.runtime.config import KafkaConfig

ALL_TOPICS: Final = (METERING_TOPIC, AUDIT_TOPIC, DLQ_TOPIC)

_log = logging.getLogger(__name__)
_client_log = logging.getLogger(f"{__name__}.librdkafka")

#: Consumer errors that mean the setup is wrong, not that the cluster is briefly away.
_CONFIG_ERRORS = frozenset(
    {
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError._AUTHENTICATION,
        KafkaError._SSL,
        KafkaError._INVALID_ARG,
    }
)


def client_config(kafka: KafkaConfig, **overrides: Any) -> dict[str, Any]:
    """librdkafka settings for the configured cluster (overrides use dotted names via ``**{...}``)."""
    if not kafka.bootstrap_servers:
        raise BusError("kafka.bootstrap_servers is not configured")
    settings: dict[str, Any] = {
        "bootstrap.servers": kafka.bootstrap_servers,
        "security.protocol": kafka.security_protocol,
    }
    if kafka.sasl_mechanism:
        settings["sasl.mechanism"] = kafka.sasl_mechanism
    if kafka.sasl_username:
        settings["sasl.username"] = kafka.sasl_username
    if kafka.sasl_password is not None:
        settings["sasl.password"] = kafka.sasl_password.get_secret_value()
    settings.update(overrides)
    return settings


def _describe(error: KafkaError | BaseException | None) -> str:
    if isinstance(error, KafkaError):
        return f"{error.name()}: {error.str()}"
    if isinstance(error, KafkaException) and error.args and isinstance(error.args[0], KafkaError):
        return _describe(error.args[0])
    return str(error)


# --------------------------------------------------------------------------- producer


class KafkaProducer:
    """A :class:`~caracald.bus.base.RecordProducer` on Kafka (idempotent, ``acks=all``).

    ``config`` is a librdkafka configuration (see :func:`client_config`); the safety settings are enforced.
    ``delivery_timeout`` bounds how long a record may wait for acknowledgement before its future fails.
    """

    def __init__(
        self, config: Mapping[str, Any], *, delivery_timeout: float = 30.0, queue_full_timeout: float = 5.0
    ) -> None:
        settings: dict[str, Any] = {
            "linger.ms": 5,
            "logger": _client_log,
            **config,
            "acks": "all",
            "enable.idempotence": True,
            "message.timeout.ms": int(delivery_timeout * 1000),
        }
        self._producer = Producer(settings)
        #: How long records gather before a batch goes out (librdkafka's ``linger.ms``).
        self.linger_ms: float = float(settings["linger.ms"])
        self._queue_full_timeout = queue_full_timeout
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name="caracal-kafka-delivery", daemon=True)
        self._poller.start()

    def _poll_loop(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.1)

    @staticmethod
    def _delivered(future: Future[None], error: KafkaError | None, message: Message) -> None:
        if future.done():  # cancelled by its owner
            return
        if error is None:
            future.set_result(None)
        elif error.code() in (KafkaError._MSG_TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
            future.set_exception(BusUnavailableError(f"Kafka did not acknowledge: {_describe(error)}"))
        else:
            future.set_exception(DeliveryError(f"Kafka refused the record: {_describe(error)}"))

    def send(
        self, topic: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> Future[None]:
        if self._closed.is_set():
            raise BusUnavailableError("the Kafka producer is closed")
        future: Future[None] = Future()
        callback = functools.partial(self._delivered, future)
        deadline = time.monotonic() + self._queue_full_timeout
        while True:
            try:
                self._producer.produce(topic, value, key, headers=list(headers) or None, on_delivery=callback)
                return future
            except BufferError:
                # The local queue is full: the cluster is slow or away. Give it a moment.
                if time.monotonic() >= deadline:
                    raise BusUnavailableError("the Kafka producer's queue is full") from None
                self._producer.poll(0.05)
            except KafkaException as exc:
                raise DeliveryError(f"cannot produce to {topic}: {_describe(exc)}") from None

    def flush(self, timeout: float = 30.0) -> int:
        remaining: int = self._producer.flush(timeout)
        return remaining

    def close(self, timeout: float = 30.0) -> None:
        if self._closed.is_set():
            return
        remaining = self._producer.flush(timeout)
        if remaining:
            _log.warning("closing the Kafka producer with %d record(s) unacknowledged", remaining)
        self._closed.set()
        self._poller.join(timeout)


# --------------------------------------------------------------------------- consumer


class KafkaBatchConsumer:
    """A :class:`~caracald.bus.base.BatchConsumer` on Kafka for one group, with manual commits."""

    def __init__(
        self,
        config: Mapping[str, Any],
        group: str,
        topics: Sequence[str],
        *,
        start: str = "earliest",
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        settings: dict[str, Any] = {
            "logger": _client_log,
            "session.timeout.ms": 10_000,
            "heartbeat.interval.ms": 2_000,
            "fetch.wait.max.ms": 100,
            **config,
            **(overrides or {}),
            "group.id": group,
            # Commits only the offsets stored by commit() (auto.offset.store is off); see the module doc.
            "enable.auto.commit": True,
            "auto.commit.interval.ms": 1000,
            "enable.auto.offset.store": False,
            "on_commit": self._on_commit,
            "auto.offset.reset": start,
            "isolation.level": "read_committed",
            "enable.partition.eof": False,
        }
        self._group = group
        self.topics = list(topics)
        self._consumer = Consumer(settings)
        self._assignment: set[tuple[str, int]] = set()
        self._committed: dict[tuple[str, int], int] = {}
        self._consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke)

    @property
    def group(self) -> str:
        return self._group

    @property
    def assignment(self) -> list[tuple[str, int]]:
        return sorted(self._assignment)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assignment.update((p.topic, p.partition) for p in partitions)
        _log.info("group %s assigned %s", self._group, sorted((p.topic, p.partition) for p in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for p in partitions:
            self._assignment.discard((p.topic, p.partition))
            self._committed.pop((p.topic, p.partition), None)
        _log.info("group %s revoked %s", self._group, sorted((p.topic, p.partition) for p in partitions))

    def poll_batch(self, max_records: int, timeout: float) -> list[Record]:
        try:
            messages = self._consumer.consume(num_messages=max_records, timeout=timeout)
        except KafkaException as exc:
            raise BusError(f"Kafka consume failed: {_describe(exc)}") from None
        except RuntimeError as exc:  # the consumer was closed
            raise BusError(f"Kafka consume failed: {exc}") from None
        records: list[Record] = []
        problem: KafkaError | None = None
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                if error.fatal() or error.code() in _CONFIG_ERRORS:
                    if records:  # never drop what was read: report the error on the next poll
                        _log.error(
                            "Kafka consumer error (after %d records): %s", len(records), _describe(error)
                        )
                        continue
                    raise BusError(f"Kafka consumer error: {_describe(error)}")
                _log.warning("Kafka consumer error: %s", _describe(error))
                problem = error
                continue
            records.append(_record(message))
        if not records and problem is not None:
            raise BusUnavailableError(f"Kafka consumer error: {_describe(problem)}")
        return records

    def commit(self, records: Sequence[Record]) -> None:
        """Store the offsets after ``records`` and commit them asynchronously (see the module doc).

        Raises :class:`CommitFailedError` when a partition is no longer this consumer's (its records will
        be read again by whoever owns it now). A commit the broker refuses is retried by the committer.
        """
        positions = next_offsets(records)
        if not positions:
            return
        owned = [tp for tp in positions if tp in self._assignment]
        lost = sorted(tp for tp in positions if tp not in self._assignment)
        offsets = [
            TopicPartition(topic, partition, positions[(topic, partition)]) for topic, partition in owned
        ]
        if offsets:
            try:
                self._consumer.store_offsets(offsets=offsets)
                self._consumer.commit(offsets=offsets, asynchronous=True)
            except KafkaException as exc:
                raise CommitFailedError(f"cannot commit offsets: {_describe(exc)}") from None
            except RuntimeError as exc:  # the consumer was closed
                raise CommitFailedError(f"cannot commit offsets: {exc}") from None
            self._committed.update((tp, positions[tp]) for tp in owned)
        if lost:
            raise CommitFailedError(
                "cannot commit offsets of partitions no longer assigned: "
                + ", ".join(f"{topic}[{partition}]" for topic, partition in lost)
            )

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        failed = [p for p in partitions or () if p.error is not None]
        if error is not None or failed:
            # The stored offsets stay stored: the committer tries again within a second.
            detail = _describe(error) if error is not None else _describe(failed[0].error)
            if error is None or error.code() != KafkaError._NO_OFFSET:
                _log.warning("group %s: a commit failed, retrying: %s", self._group, detail)

    def lag(self) -> dict[tuple[str, int], int]:
        """Per owned partition: the high watermark minus the committed offset.

        Uses what librdkafka has cached (updated by every fetch); asks the broker, briefly, only about
        partitions it knows nothing of yet.
        """
        owned = sorted(self._assignment)
        highs: dict[tuple[str, int], int] = {}
        for topic, partition in owned:
            tp = TopicPartition(topic, partition)
            try:
                _low, high = self._consumer.get_watermark_offsets(tp, cached=True)
                if high is None or high < 0:
                    _low, high = self._consumer.get_watermark_offsets(tp, timeout=1.0, cached=False)
            except KafkaException:
                continue
            if high is not None and high >= 0:
                highs[(topic, partition)] = high
        unknown = [tp for tp in highs if tp not in self._committed]
        if unknown:
            try:
                answer = self._consumer.committed([TopicPartition(t, p) for t, p in unknown], timeout=2.0)
            except KafkaException:
                answer = []
            for tp in answer:
                if tp.error is None:
                    # no commit yet: the group starts at the beginning of the log (auto.offset.reset)
                    self._committed[(tp.topic, tp.partition)] = max(tp.offset, 0)
        return {tp: max(high - self._committed[tp], 0) for tp, high in highs.items() if tp in self._committed}

    def close(self) -> None:
        # Leaves the group at once, so that the partitions move without waiting for a session timeout.
        with contextlib.suppress(RuntimeError):  # already closed
            self._consumer.close()


@functools.lru_cache(maxsize=1024)
def _timestamp(millis: int) -> datetime:
    # Records come in bursts produced within the same millisecond: one datetime serves them all.
    return datetime.fromtimestamp(millis / 1000, UTC)


def _record(message: Message) -> Record:
    kind, millis = message.timestamp()
    stamp = None if kind == TIMESTAMP_NOT_AVAILABLE else _timestamp(millis)
    headers = _headers(message.headers())
    key = message.key()
    value = message.value()
    return Record(
        message.topic() or "",
        message.partition() or 0,
        message.offset() or 0,
        key if key is None or type(key) is bytes else _as_bytes(key),
        value if type(value) is bytes else _as_bytes(value),
        headers,
        stamp,
    )


def _headers(raw: Any) -> list[tuple[str, bytes]]:
    if not raw:
        return []
    if type(raw) is list:
        for _, value in raw:  # a plain loop: this runs for every record
            if type(value) is not bytes:
                break
        else:
            return raw  # what librdkafka gives for headers with values: already (str, bytes) pairs
    items = raw.items() if isinstance(raw, dict) else raw
    return [(str(name), _as_bytes(value)) for name, value in items]


def _as_bytes(value: object) -> bytes:
    if value is None:
        return b""
    return value if isinstance(value, bytes) else str(value).encode()


def _admin(config: Mapping[str, Any]) -> AdminClient:
    return AdminClient({k: v for k, v in config.items() if k != "logger"}, logger=_client_log)


# --------------------------------------------------------------------------- administration


def create_topics(
    config: Mapping[str, Any],
    topics: Iterable[str] = ALL_TOPICS,
    *,
    partitions: int = 12,
    replication_factor: int = 3,
    retention_ms: int | None = 7 * 24 * 3600 * 1000,
    min_insync_replicas: int | None = None,
    extra: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> list[str]:
    """Create the topics that do not exist yet; return the names created.

    With ``replication_factor`` 3, ``min.insync.replicas`` defaults to 2: ``acks=all`` then means two copies.
    A ``retention_ms`` of None keeps the broker's default; -1 keeps records forever.
    """
    settings: dict[str, str] = dict(extra or {})
    if retention_ms is not None:
        settings.setdefault("retention.ms", str(retention_ms))
    if min_insync_replicas is None and replication_factor >= 3:
        min_insync_replicas = 2
    if min_insync_replicas is not None:
        settings.setdefault("min.insync.replicas", str(min_insync_replicas))
    names = list(dict.fromkeys(topics))
    admin = _admin(config)
    new = [
        NewTopic(name, num_partitions=partitions, replication_factor=replication_factor, config=settings)
        for name in names
    ]
    futures = admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
    created: list[str] = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
            created.append(name)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise BusError(f"cannot create topic {name}: {_describe(exc)}") from None
    return sorted(created)


def _partitions(admin: AdminClient, topic: str, timeout: float) -> list[int]:
    metadata = admin.list_topics(topic, timeout=timeout)
    described = metadata.topics.get(topic)
    if described is None or described.error is not None:
        raise BusError(f"topic {topic} does not exist")
    return sorted(described.partitions)


def committed_offsets(
    config: Mapping[str, Any], group: str, topic: str, *, timeout: float = 30.0
) -> dict[int, int]:
    """What ``group`` committed on ``topic``, per partition (partitions without a commit are left out).

    Asked through a consumer of the group that never joins it (an OffsetFetch), not the admin API: the admin
    client's ListConsumerGroupOffsets crashes the process (librdkafka 2.x, a NULL consumer group handle in
    ``rd_kafka_handle_OffsetFetch``) when the coordinator answers "load in progress", as after a broker
    restart.
    """
    partitions = _partitions(_admin(config), topic, timeout)
    consumer = Consumer(
        {
            "logger": _client_log,
            **config,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
        }
    )
    try:
        answer = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=timeout)
    except KafkaException as exc:
        raise BusError(f"cannot read the offsets of group {group}: {_describe(exc)}") from None
    finally:
        with contextlib.suppress(RuntimeError):
            consumer.close()
    failed = [p for p in answer if p.error is not None]
    if failed:
        raise BusError(f"cannot read the offsets of group {group}: {_describe(failed[0].error)}")
    return {p.partition: p.offset for p in answer if p.offset >= 0}


def reset_offsets(
    config: Mapping[str, Any], group: str, topic: str, offset: int = 0, *, timeout: float = 30.0
) -> None:
    """Make ``group`` read ``topic`` again from ``offset`` on every partition (a replay).

    Kafka refuses this while the group has members: stop its consumers first.
    """
    admin = _admin(config)
    request = ConsumerGroupTopicPartitions(
        group, [TopicPartition(topic, p, offset) for p in _partitions(admin, topic, timeout)]
    )
    futures = admin.alter_consumer_group_offsets([request], request_timeout=timeout)
    try:
        futures[group].result(timeout=timeout)
    except KafkaException as exc:
        raise BusError(f"cannot reset the offsets of group {group}: {_describe(exc)}") from None
