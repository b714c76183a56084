"""Kafka topics to JSON lines and back.

Export: a consumer *assigned* to every partition (no group membership, no offset commits, so no consumer
group is created or moved) reads each partition from its low watermark up to the high watermark taken when
the backup started, and writes one JSON object per record::

    {"partition": 0, "offset": 41, "timestamp": 1705312800000, "timestamp_type": "create",
     "key": "<base64>", "value": "<base64>", "headers": [["event-type", "<base64>"]]}

Keys, values and header values are base64 (exact bytes; ``null`` stays ``null``). Records of one partition
appear in offset order. Transaction markers and aborted records are not records, so a partition may hold
fewer records than ``high - low``; the manifest keeps the actual count per partition.

Import: the records are produced again, each to its original partition with its key, headers and
timestamp, by an idempotent producer (per-partition order kept). The offsets are new ones: they follow
whatever the topic already holds, and consumer groups' committed offsets are not part of a backup.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from confluent_kafka import (
    TIMESTAMP_CREATE_TIME,
    TIMESTAMP_LOG_APPEND_TIME,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from caracal_ops.kafka_admin import client_settings
from caracald.core.errors import StoreUnavailableError, ValidationError
from caracald.runtime.config import KafkaConfig

_TIMESTAMP_TYPES = {TIMESTAMP_CREATE_TIME: "create", TIMESTAMP_LOG_APPEND_TIME: "log_append"}


class ExportError(Exception):
    """The export could not complete; the message says where it stopped."""


@dataclass
class PartitionExport:
    partition: int
    low: int
    high: int
    records: int = 0
    first_offset: int | None = None
    last_offset: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "partition": self.partition,
            "low": self.low,
            "high": self.high,
            "records": self.records,
            "first_offset": self.first_offset,
            "last_offset": self.last_offset,
        }


@dataclass
class TopicExport:
    topic: str
    partitions: dict[int, PartitionExport] = field(default_factory=dict)

    @property
    def records(self) -> int:
        return sum(p.records for p in self.partitions.values())


def _b64(data: bytes | str | None) -> str | None:
    if data is None:
        return None
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text, validate=True)


def encode_record(message: Message) -> str:
    ts_type, ts = message.timestamp()
    raw = message.headers() or []
    headers = list(raw.items()) if isinstance(raw, dict) else list(raw)
    return json.dumps(
        {
            "partition": message.partition(),
            "offset": message.offset(),
            "timestamp": ts if ts_type in _TIMESTAMP_TYPES else None,
            "timestamp_type": _TIMESTAMP_TYPES.get(ts_type),
            "key": _b64(message.key()),
            "value": _b64(message.value()),
            "headers": [[name, _b64(value)] for name, value in headers],
        },
        separators=(",", ":"),
    )


@dataclass(frozen=True, slots=True)
class Record:
    partition: int
    offset: int
    timestamp: int | None
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]


def decode_record(line: str) -> Record:
    data = json.loads(line)
    headers = tuple((str(name), _unb64(value)) for name, value in data.get("headers") or [])
    return Record(
        partition=int(data["partition"]),
        offset=int(data["offset"]),
        timestamp=int(data["timestamp"]) if data.get("timestamp") is not None else None,
        key=_unb64(data.get("key")),
        value=_unb64(data.get("value")),
        headers=headers,
    )


def read_export(path: Path) -> Iterator[Record]:
    """The records of an export file; a malformed line raises ValidationError naming it."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield decode_record(line)
            except (ValueError, KeyError, TypeError) as exc:
                raise ValidationError(f"{path.name} line {number} is not a record: {exc}") from None


def export_topic(
    config: KafkaConfig,
    topic: str,
    ranges: dict[int, tuple[int, int]],
    out: TextIO,
    *,
    progress: Callable[[int], None] | None = None,
    idle_timeout: float = 60.0,
    deadline: float | None = None,
) -> TopicExport:
    """Write ``topic``'s records in ``ranges`` ({partition: (low, high)}) to ``out``, one JSON line each."""
    result = TopicExport(topic, {p: PartitionExport(p, low, high) for p, (low, high) in ranges.items()})
    pending = {p for p, (low, high) in ranges.items() if high > low}
    if not pending:
        return result
    consumer = Consumer(
        {
            **client_settings(config),
            # required by the client, never used: partitions are assigned, and nothing is committed
            "group.id": f"caracal-backup-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "log_level": 0,
        }
    )
    written = 0
    last_error: str | None = None
    try:
        consumer.assign([TopicPartition(topic, p, ranges[p][0]) for p in sorted(pending)])
        last_progress = time.monotonic()
        while pending:
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise ExportError(f"timed out with partitions {sorted(pending)} of {topic} unfinished")
            if now - last_progress > idle_timeout:
                where = ", ".join(
                    f"partition {p} at offset {result.partitions[p].last_offset} of {ranges[p][1]}"
                    for p in sorted(pending)
                )
                why = f"last error: {last_error}" if last_error else "an open transaction holds a partition?"
                raise ExportError(f"no progress for {idle_timeout:g} s reading {topic} ({where}); {why}")
            try:
                messages = consumer.consume(num_messages=1000, timeout=1.0)
            except KafkaException as exc:
                raise StoreUnavailableError(f"Kafka is unavailable: {exc}") from None
            for message in messages:
                partition = int(message.partition() or 0)
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        if partition in pending and int(message.offset() or 0) >= ranges[partition][1]:
                            pending.discard(partition)
                            last_progress = time.monotonic()
                        continue
                    if error.fatal():
                        raise StoreUnavailableError(f"Kafka is unavailable: {error.str()}")
                    last_error = error.str()
                    continue
                if partition not in pending:
                    continue
                offset = int(message.offset() or 0)
                high = ranges[partition][1]
                if offset >= high:
                    pending.discard(partition)
                    continue
                out.write(encode_record(message))
                out.write("\n")
                stats = result.partitions[partition]
                stats.records += 1
                if stats.first_offset is None:
                    stats.first_offset = offset
                stats.last_offset = offset
                written += 1
                last_progress = time.monotonic()
                if offset >= high - 1:
                    pending.discard(partition)
            if progress is not None and messages:
                progress(written)
    finally:
        consumer.close()
    return result


@dataclass
class Delivery:
    delivered: int = 0
    failed: int = 0
    first_error: str | None = None


#: With ``new_timestamps``, the header that keeps a record's original timestamp (milliseconds, decimal).
ORIGINAL_TIMESTAMP_HEADER = "caracal.restore.original-timestamp"


def produce_records(
    config: KafkaConfig,
    topic: str,
    records: Iterator[Record],
    *,
    progress: Callable[[int], None] | None = None,
    flush_timeout: float = 300.0,
    new_timestamps: bool = False,
) -> Delivery:
    """Produce ``records`` to their partitions of ``topic``; returns what the broker acknowledged.

    Records keep their timestamps, unless ``new_timestamps``: then they get the current time, and their
    original one goes in the header ``caracal.restore.original-timestamp`` (a topic's time-based
    retention would otherwise delete records older than it as soon as they are back).
    """
    delivery = Delivery()

    def acknowledged(error: KafkaError | None, message: Message) -> None:
        if error is None:
            delivery.delivered += 1
        else:
            delivery.failed += 1
            if delivery.first_error is None:
                delivery.first_error = f"partition {message.partition()}: {error.str()}"

    producer = Producer(
        {
            **client_settings(config),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 20,
            "log_level": 0,
        }
    )
    for sent, record in enumerate(records, 1):
        headers: list[tuple[str, str | bytes | None]] = list(record.headers)
        timestamp = record.timestamp or 0
        if new_timestamps:
            if record.timestamp is not None:
                headers.append((ORIGINAL_TIMESTAMP_HEADER, str(record.timestamp).encode()))
            timestamp = 0
        while True:
            try:
                producer.produce(
                    topic,
                    value=record.value,
                    key=record.key,
                    partition=record.partition,
                    timestamp=timestamp,
                    headers=headers,
                    on_delivery=acknowledged,
                )
                break
            except BufferError:
                producer.poll(0.5)
        if sent % 1000 == 0:
            producer.poll(0)
            if progress is not None:
                progress(delivery.delivered)
    remaining = producer.flush(flush_timeout)
    if remaining:
        delivery.failed += remaining
        delivery.first_error = delivery.first_error or f"{remaining} record(s) unacknowledged after flush"
    if progress is not None:
        progress(delivery.delivered)
    return delivery
