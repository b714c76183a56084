"""Per-agent hourly spend totals (``spend_totals``), kept by a trigger on ``ledger_events``.

The trigger of migration 0005 adds each inserted event to its (agent, currency, UTC hour) row in the same
transaction, from the statement's transition table, so a duplicate skipped by ``ON CONFLICT DO NOTHING``
never counts. :func:`spending` answers a range query from the whole hours inside it plus the raw events of
its two ragged ends (under an hour each), so it agrees exactly with summing the events
(:func:`caracald.store.ledger.spending`) and costs a few hundred rows for a month.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from caracald.core.ledger import CHARGED_EVENT_TYPES, SPENDING_EVENT_TYPES
from caracald.store.database import Connection

HOUR = timedelta(hours=1)


def floor_hour(at: datetime) -> datetime:
    """The first instant of ``at``'s UTC hour."""
    utc = at.astimezone(UTC)
    return utc.replace(minute=0, second=0, microsecond=0)


def ceil_hour(at: datetime) -> datetime:
    """The first instant of the UTC hour at or after ``at``."""
    floor = floor_hour(at)
    return floor if floor == at else floor + HOUR


def spending(
    conn: Connection, agent_id: uuid.UUID, start: datetime, end: datetime
) -> dict[str, tuple[Decimal, int]]:
    """Per currency: (total charged, number of spending events) in [start, end).

    Whole hours come from ``spend_totals``, the partial hours at either end from ``ledger_events``; a
    currency shows when any event of it lies in the range, as with the raw query.
    """
    first, last = ceil_hour(start), floor_hour(end)
    if first >= last:  # no whole hour inside: the range is short, read the events
        edges = [(start, end)]
        first = last = start
    else:
        edges = [(start, first), (last, end)]
    rows = conn.execute(
        """
        WITH parts AS (
            SELECT currency, total, spending_events AS spending, ledger_events AS events
              FROM spend_totals
             WHERE agent_id = %(agent)s AND bucket >= %(first)s AND bucket < %(last)s
            UNION ALL
            SELECT currency,
                   COALESCE(sum(cost) FILTER (WHERE event_type = ANY(%(charged)s)), 0),
                   count(*) FILTER (WHERE event_type = ANY(%(spending)s)),
                   count(*)
              FROM ledger_events
             WHERE agent_id = %(agent)s
               AND ((occurred_at >= %(s1)s AND occurred_at < %(e1)s)
                    OR (occurred_at >= %(s2)s AND occurred_at < %(e2)s))
             GROUP BY currency
        )
        SELECT currency, sum(total) AS total, sum(spending) AS spending
          FROM parts
         GROUP BY currency
        HAVING sum(events) > 0
         ORDER BY currency
        """,
        {
            "agent": agent_id,
            "first": first,
            "last": last,
            "charged": [str(t) for t in CHARGED_EVENT_TYPES],
            "spending": [str(t) for t in SPENDING_EVENT_TYPES],
            "s1": edges[0][0],
            "e1": edges[0][1],
            "s2": edges[-1][0],
            "e2": edges[-1][1] if len(edges) > 1 else edges[-1][0],
        },
    ).fetchall()
    return {r["currency"].strip(): (Decimal(r["total"]), int(r["spending"])) for r in rows}


def rebuild(conn: Connection, agent_id: uuid.UUID | None = None) -> int:
    """Recompute the totals (of one agent, or all) from the events, in the caller's transaction.

    Returns how many total rows were written. Only needed if events were changed behind the ledger's back.
    """
    where = "WHERE agent_id = %(agent)s" if agent_id is not None else ""
    conn.execute(f"DELETE FROM spend_totals {where}", {"agent": agent_id})
    cur = conn.execute(
        f"""
        INSERT INTO spend_totals (agent_id, currency, bucket, total, spending_events, ledger_events)
        SELECT agent_id, currency, date_trunc('hour', occurred_at, 'UTC'),
               COALESCE(sum(cost) FILTER (WHERE event_type = ANY(%(charged)s)), 0),
               count(*) FILTER (WHERE event_type = ANY(%(spending)s)),
               count(*)
          FROM ledger_events {where}
         GROUP BY 1, 2, 3
        """,
        {
            "agent": agent_id,
            "charged": [str(t) for t in CHARGED_EVENT_TYPES],
            "spending": [str(t) for t in SPENDING_EVENT_TYPES],
        },
    )
    return max(cur.rowcount, 0)
