"""Spend totals from the ledger, the source every budget counter can be rebuilt from."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

from caracald.core.ledger import CHARGED_EVENT_TYPES, LedgerEventType
from caracald.store.database import Connection

_CHARGED = [str(t) for t in CHARGED_EVENT_TYPES]


def charged_total(
    conn: Connection, agent_ids: Sequence[uuid.UUID], currency: str, start: datetime, end: datetime
) -> Decimal:
    """What the agents were charged in ``currency`` in [start, end)."""
    row = conn.execute(
        """
        SELECT COALESCE(sum(cost), 0) AS total FROM ledger_events
         WHERE agent_id = ANY(%s) AND currency = %s AND event_type = ANY(%s)
           AND occurred_at >= %s AND occurred_at < %s
        """,
        (list(agent_ids), currency, _CHARGED, start, end),
    ).fetchone()
    return Decimal(row["total"]) if row else Decimal(0)


def charged_by_bucket(
    conn: Connection,
    agent_ids: Sequence[uuid.UUID],
    currency: str,
    start: datetime,
    end: datetime,
    bucket_seconds: int,
) -> dict[int, Decimal]:
    """Charges in [start, end) grouped by ``floor(epoch seconds / bucket_seconds)``."""
    rows = conn.execute(
        """
        SELECT floor(extract(epoch FROM occurred_at) / %s)::bigint AS bucket, sum(cost) AS total
          FROM ledger_events
         WHERE agent_id = ANY(%s) AND currency = %s AND event_type = ANY(%s)
           AND occurred_at >= %s AND occurred_at < %s
         GROUP BY 1
        """,
        (bucket_seconds, list(agent_ids), currency, _CHARGED, start, end),
    ).fetchall()
    return {int(r["bucket"]): Decimal(r["total"]) for r in rows}


def open_reservations(
    conn: Connection, agent_ids: Sequence[uuid.UUID], currency: str, since: datetime
) -> tuple[Decimal, int]:
    """Holds the ledger shows as reserved and not yet settled or expired: (amount, count)."""
    row = conn.execute(
        """
        SELECT COALESCE(sum((r.metadata->>'hold')::numeric), 0) AS held, count(*) AS holds
          FROM ledger_events r
         WHERE r.event_type = %s AND r.agent_id = ANY(%s) AND r.currency = %s AND r.occurred_at >= %s
           AND NOT EXISTS (
               SELECT 1 FROM ledger_events o
                WHERE o.request_id = r.request_id AND o.event_type = ANY(%s))
        """,
        (
            str(LedgerEventType.RESERVATION),
            list(agent_ids),
            currency,
            since,
            [str(LedgerEventType.SETTLEMENT), str(LedgerEventType.EXPIRY)],
        ),
    ).fetchone()
    return (Decimal(row["held"]), int(row["holds"])) if row else (Decimal(0), 0)
