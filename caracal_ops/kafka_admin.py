"""Kafka administration for operators: topics, brokers, consumer lag, topic creation.

Lag is computed the way ``kafka-consumer-groups --describe`` prints it: per partition, the group's committed
offset, the partition's log end offset (high watermark) and their difference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource
from confluent_kafka.admin._resource import ResourceType
from confluent_kafka.cimpl import NewTopic

from caracald.core.errors import CaracalError, NotFoundError, StoreUnavailableError, ValidationError
from caracald.core.events import AUDIT_TOPIC, DLQ_TOPIC, METERING_TOPIC
from caracald.runtime.config import KafkaConfig

CARACAL_TOPICS = (METERING_TOPIC, AUDIT_TOPIC, DLQ_TOPIC)
#: Errors of a partition whose leadership is still settling (a topic created a moment ago).
_SETTLING = frozenset(
    {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.UNKNOWN_TOPIC_OR_PART}
)
_TIMEOUT = 10.0


def client_settings(config: KafkaConfig) -> dict[str, Any]:
    if not config.bootstrap_servers:
        raise ValidationError(
            "no Kafka configured: set kafka.bootstrap_servers (or CARACAL_KAFKA_BOOTSTRAP_SERVERS); "
            "the embedded default keeps its events in PostgreSQL"
        )
    settings: dict[str, Any] = {
        "bootstrap.servers": config.bootstrap_servers,
        "security.protocol": config.security_protocol,
    }
    if config.sasl_mechanism:
        settings["sasl.mechanism"] = config.sasl_mechanism
        settings["sasl.username"] = config.sasl_username or ""
        if config.sasl_password is not None:
            settings["sasl.password"] = config.sasl_password.get_secret_value()
    return settings


def _admin(config: KafkaConfig) -> AdminClient:
    # librdkafka's own connection chatter would bury the one-line error the command prints
    return AdminClient({**client_settings(config), "log_level": 0})


def _unavailable(exc: Exception) -> CaracalError:
    return StoreUnavailableError(f"Kafka is unavailable: {exc}")


@dataclass(frozen=True, slots=True)
class BrokerInfo:
    broker_id: int
    host: str
    port: int
    is_controller: bool


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    partition: int
    leader: int
    replicas: tuple[int, ...]
    in_sync: tuple[int, ...]
    low: int
    high: int


@dataclass(frozen=True, slots=True)
class TopicInfo:
    name: str
    partitions: tuple[PartitionInfo, ...]
    config: dict[str, str]

    @property
    def replication_factor(self) -> int:
        return len(self.partitions[0].replicas) if self.partitions else 0

    @property
    def messages(self) -> int:
        return sum(p.high - p.low for p in self.partitions)


@dataclass(frozen=True, slots=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int | None  # None: the group never committed on this partition
    log_end: int
    lag: int


def list_brokers(config: KafkaConfig) -> list[BrokerInfo]:
    try:
        metadata = _admin(config).list_topics(timeout=_TIMEOUT)
    except KafkaException as exc:
        raise _unavailable(exc) from None
    return sorted(
        (
            BrokerInfo(b.id, b.host or "", b.port, b.id == metadata.controller_id)
            for b in metadata.brokers.values()
        ),
        key=lambda b: b.broker_id,
    )


def list_topics(config: KafkaConfig, *, include_internal: bool = False) -> list[str]:
    try:
        metadata = _admin(config).list_topics(timeout=_TIMEOUT)
    except KafkaException as exc:
        raise _unavailable(exc) from None
    return sorted(t for t in metadata.topics if include_internal or not t.startswith("__"))


def _watermarks(
    config: KafkaConfig, partitions: list[TopicPartition]
) -> dict[tuple[str, int], tuple[int, int]]:
    consumer = Consumer(
        {
            **client_settings(config),
            "group.id": "caracal-ops-inspector",
            "enable.auto.commit": False,
            "log_level": 0,
        }
    )
    try:
        return {(tp.topic, tp.partition): _watermark(consumer, tp) for tp in partitions}
    finally:
        consumer.close()


def _watermark(consumer: Consumer, tp: TopicPartition, attempts: int = 8) -> tuple[int, int]:
    """A partition's (low, high) offsets, retrying the transient errors of a topic that just changed
    (its leader not elected or not yet known to every broker)."""
    for attempt in range(attempts):
        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=_TIMEOUT, cached=False)
            return int(low), int(high)
        except KafkaException as exc:
            error = exc.args[0]
            transient = isinstance(error, KafkaError) and (error.retriable() or error.code() in _SETTLING)
            if attempt + 1 == attempts or not transient:
                raise _unavailable(exc) from None
            time.sleep(0.1 * 2**attempt)
    raise AssertionError("unreachable")


def describe_topic(config: KafkaConfig, topic: str) -> TopicInfo:
    admin = _admin(config)
    try:
        metadata = admin.list_topics(topic=topic, timeout=_TIMEOUT)
    except KafkaException as exc:
        raise _unavailable(exc) from None
    found = metadata.topics.get(topic)
    if found is None or found.error is not None:
        raise NotFoundError(f"topic {topic!r} does not exist")
    try:
        (future,) = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)]).values()
        entries = future.result(timeout=_TIMEOUT)
        settings = {name: str(entry.value) for name, entry in entries.items() if not entry.is_default}
    except KafkaException:
        settings = {}
    marks = _watermarks(config, [TopicPartition(topic, p) for p in found.partitions])
    partitions = tuple(
        PartitionInfo(
            p.id,
            p.leader,
            tuple(p.replicas),
            tuple(p.isrs),
            *marks[(topic, p.id)],
        )
        for p in sorted(found.partitions.values(), key=lambda p: p.id)
    )
    return TopicInfo(topic, partitions, settings)


def consumer_lag(config: KafkaConfig, group: str, topics: list[str] | None = None) -> list[PartitionLag]:
    """Per-partition lag of a consumer group on the topics it has committed on (or on ``topics``).

    The committed offsets come from an OffsetFetch by a consumer of the group that never joins it, not from
    the admin API's ListConsumerGroupOffsets, which crashes the process (librdkafka 2.x) when the group
    coordinator is still loading, as right after a broker restart.
    """
    admin = _admin(config)
    try:
        metadata = admin.list_topics(timeout=_TIMEOUT)
    except KafkaException as exc:
        raise _unavailable(exc) from None
    if topics:
        for topic in topics:
            info = metadata.topics.get(topic)
            if info is None or info.error is not None:
                raise NotFoundError(f"topic {topic!r} does not exist")
        candidates = list(topics)
    else:  # every topic the group may have committed on
        candidates = sorted(
            t for t, info in metadata.topics.items() if info.error is None and not t.startswith("__")
        )
    partitions = [TopicPartition(t, p) for t in candidates for p in sorted(metadata.topics[t].partitions)]
    by_partition = _committed(config, group, partitions)
    wanted = set(topics) if topics else {topic for topic, _ in by_partition}
    if not wanted:
        raise NotFoundError(f"consumer group {group!r} not found (it has no committed offsets)")
    partitions = [tp for tp in partitions if tp.topic in wanted]
    marks = _watermarks(config, partitions)
    lags = []
    for tp in partitions:
        low, high = marks[(tp.topic, tp.partition)]
        offset = by_partition.get((tp.topic, tp.partition))
        lag = high - (offset if offset is not None else low)
        lags.append(PartitionLag(tp.topic, tp.partition, offset, high, max(lag, 0)))
    return lags


def _committed(
    config: KafkaConfig, group: str, partitions: list[TopicPartition]
) -> dict[tuple[str, int], int]:
    """The offsets ``group`` committed on ``partitions`` (those without a commit are left out)."""
    if not partitions:
        return {}
    consumer = Consumer(
        {
            **client_settings(config),
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "log_level": 0,
        }
    )
    try:
        answer = consumer.committed(partitions, timeout=_TIMEOUT)
    except KafkaException as exc:
        raise _unavailable(exc) from None
    finally:
        consumer.close()
    failed = [tp for tp in answer if tp.error is not None]
    if failed:
        raise _unavailable(KafkaException(failed[0].error))
    return {(tp.topic, tp.partition): tp.offset for tp in answer if tp.offset >= 0}


def create_topics(
    config: KafkaConfig,
    *,
    names: tuple[str, ...] = CARACAL_TOPICS,
    partitions: int = 12,
    replication_factor: int = 3,
    retention_ms: int | None = None,
) -> dict[str, str]:
    """Create the topics that do not exist yet. Returns, per topic, "created" or "exists"."""
    if partitions < 1 or replication_factor < 1:
        raise ValidationError("partitions and replication factor must be at least 1")
    admin = _admin(config)
    existing = set(list_topics(config, include_internal=True))
    settings = {"retention.ms": str(retention_ms)} if retention_ms is not None else {}
    todo = [NewTopic(n, partitions, replication_factor, config=settings) for n in names if n not in existing]
    results = {n: "exists" for n in names if n in existing}
    if todo:
        for name, future in admin.create_topics(todo, request_timeout=_TIMEOUT).items():
            try:
                future.result(timeout=_TIMEOUT)
            except KafkaException as exc:
                raise ValidationError(f"cannot create topic {name}: {exc.args[0].str()}") from None
            results[name] = "created"
    return results
