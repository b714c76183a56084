"""Ledger events: insert (idempotent by key) and spending summaries."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from psycopg.types.json import Jsonb

from caracald.core.ledger import CHARGED_EVENT_TYPES, SPENDING_EVENT_TYPES, LedgerEvent, LedgerEventType
from caracald.core.money import Money
from caracald.store.database import Connection

#: The columns :func:`insert_events` fills, with their array types for ``unnest``.
_INSERTED: tuple[tuple[str, str], ...] = (
    ("idempotency_key", "uuid"),
    ("event_type", "text"),
    ("agent_id", "uuid"),
    ("request_id", "uuid"),
    ("occurred_at", "timestamptz"),
    ("resource", "text"),
    ("model", "text"),
    ("input_tokens", "bigint"),
    ("output_tokens", "bigint"),
    ("cached_input_tokens", "bigint"),
    ("cost", "numeric"),
    ("currency", "text"),
    ("metadata", "jsonb"),
)
_COLUMNS = ", ".join(name for name, _ in _INSERTED)
# One statement for the whole list (the ledger's statement triggers then run once, not once per event),
# inserting in the list's order.
_INSERT_EVENTS = f"""
INSERT INTO ledger_events ({_COLUMNS})
SELECT {_COLUMNS}
  FROM unnest({", ".join(f"%s::{kind}[]" for _, kind in _INSERTED)}) WITH ORDINALITY AS e({_COLUMNS}, ord)
 ORDER BY ord
ON CONFLICT (idempotency_key) DO NOTHING
"""


def insert_events(conn: Connection, events: Iterable[LedgerEvent]) -> int:
    """Insert events, skipping any whose idempotency key is already recorded. Returns how many were new."""
    listed = list(events)
    if not listed:
        return 0
    columns = (
        [e.idempotency_key for e in listed],
        [str(e.event_type) for e in listed],
        [e.agent_id for e in listed],
        [e.request_id for e in listed],
        [e.occurred_at for e in listed],
        [e.resource for e in listed],
        [e.model for e in listed],
        [e.input_tokens for e in listed],
        [e.output_tokens for e in listed],
        [e.cached_input_tokens for e in listed],
        [e.cost.amount for e in listed],
        [e.cost.currency for e in listed],
        [Jsonb(e.metadata) for e in listed],
    )
    with conn.cursor() as cur:
        cur.execute(_INSERT_EVENTS, columns)
        return max(cur.rowcount, 0)


def spending(
    conn: Connection, agent_id: uuid.UUID, start: datetime, end: datetime
) -> dict[str, tuple[Decimal, int]]:
    """Per currency: (total charged, number of spending events) in [start, end)."""
    rows = conn.execute(
        """
        SELECT currency,
               COALESCE(sum(cost) FILTER (WHERE event_type = ANY(%(charged)s)), 0) AS total,
               count(*) FILTER (WHERE event_type = ANY(%(spending)s)) AS events
          FROM ledger_events
         WHERE agent_id = %(agent)s AND occurred_at >= %(start)s AND occurred_at < %(end)s
         GROUP BY currency
         ORDER BY currency
        """,
        {
            "charged": [str(t) for t in CHARGED_EVENT_TYPES],
            "spending": [str(t) for t in SPENDING_EVENT_TYPES],
            "agent": agent_id,
            "start": start,
            "end": end,
        },
    ).fetchall()
    return {r["currency"].strip(): (Decimal(r["total"]), int(r["events"])) for r in rows}


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """A ledger row as stored: the event, its row id, when it was recorded, and its batch once sealed."""

    event_id: int
    event: LedgerEvent
    recorded_at: datetime
    batch_id: uuid.UUID | None


def list_events(
    conn: Connection,
    *,
    agent_id: uuid.UUID | None,
    start: datetime,
    end: datetime,
    limit: int,
) -> list[StoredEvent]:
    """Events that occurred in [start, end), newest first, of one agent or of all."""
    where = "occurred_at >= %(start)s AND occurred_at < %(end)s"
    if agent_id is not None:
        where += " AND agent_id = %(agent)s"
    rows = conn.execute(
        f"""
        SELECT event_id, idempotency_key, event_type, agent_id, request_id, occurred_at, recorded_at,
               resource, model, input_tokens, output_tokens, cached_input_tokens, cost, currency, metadata,
               merkle_root_id
          FROM ledger_events
         WHERE {where}
         ORDER BY occurred_at DESC, event_id DESC
         LIMIT %(limit)s
        """,
        {"start": start, "end": end, "agent": agent_id, "limit": limit},
    ).fetchall()
    return [
        StoredEvent(
            event_id=int(r["event_id"]),
            event=LedgerEvent(
                idempotency_key=r["idempotency_key"],
                event_type=LedgerEventType(r["event_type"]),
                agent_id=r["agent_id"],
                occurred_at=r["occurred_at"],
                cost=Money(Decimal(r["cost"]), r["currency"].strip()),
                resource=r["resource"],
                request_id=r["request_id"],
                model=r["model"],
                input_tokens=r["input_tokens"],
                output_tokens=r["output_tokens"],
                cached_input_tokens=r["cached_input_tokens"],
                metadata=dict(r["metadata"] or {}),
            ),
            recorded_at=r["recorded_at"],
            batch_id=r["merkle_root_id"],
        )
        for r in rows
    ]
