"""Dead letters: records a consumer could not apply, kept for triage (redrive or purge)."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import psycopg
from psycopg.rows import dict_row


class DeadLetterStatus(StrEnum):
    PENDING = "pending"
    REDRIVEN = "redriven"
    PURGED = "purged"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    source_topic: str
    source_partition: int
    source_offset: int
    consumer_group: str
    key: bytes | None
    payload: bytes
    headers: tuple[tuple[str, bytes], ...]
    error_type: str
    error_message: str
    retry_count: int
    failed_at: datetime
    event_id: uuid.UUID | None = None
    dlq_id: int | None = None
    status: DeadLetterStatus = DeadLetterStatus.PENDING
    resolved_at: datetime | None = None
    resolved_by: str | None = None


@dataclass(frozen=True, slots=True)
class DeadLetterStats:
    pending: int
    oldest_failed_at: datetime | None


def _headers_json(headers: Iterable[tuple[str, bytes]]) -> str:
    return json.dumps([[name, base64.b64encode(value).decode()] for name, value in headers])


def _headers(raw: Any) -> tuple[tuple[str, bytes], ...]:
    items = json.loads(raw) if isinstance(raw, str | bytes) else (raw or [])
    return tuple((str(name), base64.b64decode(value)) for name, value in items)


_COLUMNS = (
    "source_topic, source_partition, source_offset, consumer_group, message_key, payload, headers, "
    "error_type, error_message, retry_count, failed_at, event_id"
)


def insert(conn: psycopg.Connection[Any], letters: Sequence[DeadLetter]) -> int:
    """Record dead letters; one already recorded for the same group and source position is kept as it is.

    Returns how many were new.
    """
    if not letters:
        return 0
    with conn.cursor() as cur:
        cur.executemany(
            f"""
            INSERT INTO dlq_events ({_COLUMNS})
            VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s)
            ON CONFLICT (consumer_group, source_topic, source_partition, source_offset) DO NOTHING
            """,
            [
                (
                    d.source_topic,
                    d.source_partition,
                    d.source_offset,
                    d.consumer_group,
                    d.key,
                    d.payload,
                    _headers_json(d.headers),
                    d.error_type,
                    # PostgreSQL text cannot hold NUL; the message is for people
                    d.error_message.replace("\x00", "\\0"),
                    d.retry_count,
                    d.failed_at,
                    d.event_id,
                )
                for d in letters
            ],
        )
        return max(cur.rowcount, 0)


def stats(conn: psycopg.Connection[Any]) -> DeadLetterStats:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "SELECT count(*) AS pending, min(failed_at) AS oldest FROM dlq_events WHERE status = 'pending'"
        ).fetchone()
    if row is None:
        return DeadLetterStats(0, None)
    return DeadLetterStats(int(row["pending"]), row["oldest"])


def _letter(row: dict[str, Any]) -> DeadLetter:
    return DeadLetter(
        source_topic=row["source_topic"],
        source_partition=row["source_partition"],
        source_offset=row["source_offset"],
        consumer_group=row["consumer_group"],
        key=None if row["message_key"] is None else bytes(row["message_key"]),
        payload=bytes(row["payload"]),
        headers=_headers(row["headers"]),
        error_type=row["error_type"],
        error_message=row["error_message"],
        retry_count=row["retry_count"],
        failed_at=row["failed_at"],
        event_id=row["event_id"],
        dlq_id=row["dlq_id"],
        status=DeadLetterStatus(row["status"]),
        resolved_at=row["resolved_at"],
        resolved_by=row["resolved_by"],
    )


_SELECT = f"SELECT dlq_id, {_COLUMNS}, status, resolved_at, resolved_by FROM dlq_events"


def get(conn: psycopg.Connection[Any], dlq_id: int) -> DeadLetter | None:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(f"{_SELECT} WHERE dlq_id = %s", (dlq_id,)).fetchone()
    return _letter(row) if row else None


def _filters(
    *,
    status: DeadLetterStatus | None,
    error_type: str | None,
    since: datetime | None,
    until: datetime | None = None,
    consumer_group: str | None,
    topic: str | None = None,
    event_id: uuid.UUID | None = None,
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (
        ("status", status),
        ("error_type", error_type),
        ("consumer_group", consumer_group),
        ("source_topic", topic),
    ):
        if value is not None:
            clauses.append(f"{column} = %s")
            params.append(str(value))
    if event_id is not None:
        clauses.append("event_id = %s")
        params.append(event_id)
    if since is not None:
        clauses.append("failed_at >= %s")
        params.append(since)
    if until is not None:
        clauses.append("failed_at < %s")
        params.append(until)
    return (f" WHERE {' AND '.join(clauses)}" if clauses else ""), params


def list_letters(
    conn: psycopg.Connection[Any],
    *,
    status: DeadLetterStatus | None = DeadLetterStatus.PENDING,
    error_type: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    consumer_group: str | None = None,
    topic: str | None = None,
    event_id: uuid.UUID | None = None,
    limit: int = 1000,
) -> list[DeadLetter]:
    """Dead letters, oldest first (``failed_at`` in [since, until))."""
    where, params = _filters(
        status=status,
        error_type=error_type,
        since=since,
        until=until,
        consumer_group=consumer_group,
        topic=topic,
        event_id=event_id,
    )
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            f"{_SELECT}{where} ORDER BY failed_at, dlq_id LIMIT %s", (*params, limit)
        ).fetchall()
    return [_letter(r) for r in rows]


def count(
    conn: psycopg.Connection[Any],
    *,
    status: DeadLetterStatus | None = DeadLetterStatus.PENDING,
    error_type: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    consumer_group: str | None = None,
    topic: str | None = None,
    event_id: uuid.UUID | None = None,
) -> int:
    """How many dead letters :func:`list_letters` would give without a limit."""
    where, params = _filters(
        status=status,
        error_type=error_type,
        since=since,
        until=until,
        consumer_group=consumer_group,
        topic=topic,
        event_id=event_id,
    )
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(f"SELECT count(*) AS n FROM dlq_events{where}", params).fetchone()
    return int(row["n"]) if row else 0


def get_many(
    conn: psycopg.Connection[Any], dlq_ids: Sequence[int], *, for_update: bool = False
) -> list[DeadLetter]:
    """The dead letters with these ids, in id order (``for_update`` locks them until the transaction ends)."""
    if not dlq_ids:
        return []
    lock = " FOR UPDATE" if for_update else ""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            f"{_SELECT} WHERE dlq_id = ANY(%s) ORDER BY dlq_id{lock}", (list(dlq_ids),)
        ).fetchall()
    return [_letter(r) for r in rows]


def resolve(
    conn: psycopg.Connection[Any], dlq_ids: Iterable[int], status: DeadLetterStatus, *, by: str, at: datetime
) -> int:
    """Mark pending dead letters redriven or purged; returns how many changed."""
    if status is DeadLetterStatus.PENDING:
        raise ValueError("a dead letter is resolved as redriven or purged")
    with conn.cursor() as cur:
        cur.execute(
            "UPDATE dlq_events SET status = %s, resolved_at = %s, resolved_by = %s "
            "WHERE dlq_id = ANY(%s) AND status = 'pending'",
            (str(status), at, by, list(dlq_ids)),
        )
        return max(cur.rowcount, 0)
