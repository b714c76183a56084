"""The dead letter queue: what a consumer cannot apply goes to the ``caracal.dlq`` topic and ``dlq_events``.

A dead letter on the topic is the original record (key, value and headers) plus ``caracal-dlq-*`` headers that
say where it came from and why it failed. The table row holds the same, with a triage status. The consumer
writes the table row in the same transaction as the rest of its batch, then publishes to the topic, then
commits its offsets: a crash in between publishes again (the table keeps one row per group and source
position), so the topic copy is at least once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

from caracald.bus.base import BusUnavailableError, Record, RecordProducer
from caracald.core.events import DLQ_TOPIC
from caracald.store.dlq import DeadLetter

HEADER_PREFIX: Final = "caracal-dlq-"
MAX_ERROR_MESSAGE: Final = 2000


def dead_letter(
    record: Record,
    *,
    group: str,
    error_type: str,
    error_message: str,
    retry_count: int = 0,
    event_id: uuid.UUID | None = None,
    failed_at: datetime | None = None,
) -> DeadLetter:
    return DeadLetter(
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
        consumer_group=group,
        key=record.key,
        payload=record.value,
        headers=tuple(record.headers),
        error_type=error_type,
        error_message=error_message[:MAX_ERROR_MESSAGE],
        retry_count=retry_count,
        failed_at=failed_at or datetime.now(UTC),
        event_id=event_id,
    )


def dlq_headers(letter: DeadLetter) -> list[tuple[str, bytes]]:
    """The original headers followed by the ``caracal-dlq-*`` ones."""
    extra = {
        "source-topic": letter.source_topic,
        "source-partition": str(letter.source_partition),
        "source-offset": str(letter.source_offset),
        "consumer-group": letter.consumer_group,
        "error-type": letter.error_type,
        "error-message": letter.error_message,
        "retry-count": str(letter.retry_count),
        "failed-at": letter.failed_at.isoformat(),
    }
    if letter.event_id is not None:
        extra["event-id"] = str(letter.event_id)
    return [*letter.headers, *((HEADER_PREFIX + name, value.encode()) for name, value in extra.items())]


def publish(
    producer: RecordProducer, letters: Sequence[DeadLetter], *, topic: str = DLQ_TOPIC, timeout: float = 30.0
) -> None:
    """Send dead letters to the DLQ topic and wait until the bus has every one; raise if it does not."""
    if not letters:
        return
    futures = [producer.send(topic, d.payload, key=d.key, headers=dlq_headers(d)) for d in letters]
    deadline = time.monotonic() + timeout
    producer.flush(timeout)
    for future in futures:
        try:
            future.result(timeout=max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            raise BusUnavailableError(f"the DLQ topic did not acknowledge within {timeout:g} s") from None
