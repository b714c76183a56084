"""Per-agent spend totals per UTC hour (``spend_totals``) and per UTC day (``spend_daily``), kept by a trigger
on ``ledger_events``.

The trigger of migrations 0005 and 0007 adds each inserted event to its (agent, currency, UTC hour) and
(agent, currency, UTC day) rows in the same transaction, from the statement's transition table, so a
duplicate skipped by ``ON CONFLICT DO NOTHING`` never counts. A range query is answered from the whole days
inside it, the whole hours around them and the raw events of its two ragged ends (under an hour each, see
:func:`span`), so it agrees exactly with summing the events (:func:`caracald.store.ledger.spending`) and
costs a few dozen rows for a month.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from caracald.core.ledger import CHARGED_EVENT_TYPES, SPENDING_EVENT_TYPES
from caracald.store.database import Connection

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


def floor_hour(at: datetime) -> datetime:
    """The first instant of ``at``'s UTC hour."""
    utc = at.astimezone(UTC)
    return utc.replace(minute=0, second=0, microsecond=0)


def ceil_hour(at: datetime) -> datetime:
    """The first instant of the UTC hour at or after ``at``."""
    floor = floor_hour(at)
    return floor if floor == at else floor + HOUR


def floor_day(at: datetime) -> datetime:
    """The first instant of ``at``'s UTC day."""
    utc = at.astimezone(UTC)
    return utc.replace(hour=0, minute=0, second=0, microsecond=0)


def ceil_day(at: datetime) -> datetime:
    """The first instant of the UTC day at or after ``at``."""
    floor = floor_day(at)
    return floor if floor == at else floor + DAY


@dataclass(frozen=True, slots=True)
class Span:
    """How [start, end) is read, in five consecutive parts (each possibly empty): the events of
    [start, first_hour), the hour rows of [first_hour, first_day), the day rows of [first_day, last_day), the
    hour rows of [last_day, last_hour) and the events of [last_hour, end)."""

    start: datetime
    first_hour: datetime
    first_day: datetime
    last_day: datetime
    last_hour: datetime
    end: datetime


def span(start: datetime, end: datetime) -> Span:
    """The parts of [start, end): whole UTC days, whole UTC hours around them, and the ragged ends under an
    hour each."""
    first_hour, last_hour = ceil_hour(start), floor_hour(end)
    if first_hour >= last_hour:  # no whole hour inside: all of it from the events
        return Span(start, end, end, end, end, end)
    first_day, last_day = ceil_day(first_hour), floor_day(last_hour)
    if first_day >= last_day:  # no whole day inside: the whole hours from their rows
        first_day = last_day = last_hour
    return Span(start, first_hour, first_day, last_day, last_hour, end)


def span_params(part: Span) -> dict[str, datetime]:
    """The bounds of ``part`` as the statements here name them."""
    return {
        "start": part.start,
        "first_hour": part.first_hour,
        "first_day": part.first_day,
        "last_day": part.last_day,
        "last_hour": part.last_hour,
        "end": part.end,
    }


def spending(
    conn: Connection, agent_id: uuid.UUID, start: datetime, end: datetime
) -> dict[str, tuple[Decimal, int]]:
    """Per currency: (total charged, number of spending events) in [start, end).

    Whole days come from ``spend_daily``, whole hours from ``spend_totals``, the partial hours at either end
    from ``ledger_events``; a currency shows when any event of it lies in the range, as with the raw query.
    """
    rows = conn.execute(
        """
        WITH parts AS (
            SELECT currency, total, spending_events AS spending, ledger_events AS events
              FROM spend_daily
             WHERE agent_id = %(agent)s AND day >= %(first_day)s AND day < %(last_day)s
            UNION ALL
            SELECT currency, total, spending_events, ledger_events
              FROM spend_totals
             WHERE agent_id = %(agent)s AND bucket >= %(first_hour)s AND bucket < %(first_day)s
            UNION ALL
            SELECT currency, total, spending_events, ledger_events
              FROM spend_totals
             WHERE agent_id = %(agent)s AND bucket >= %(last_day)s AND bucket < %(last_hour)s
            UNION ALL
            SELECT currency,
                   COALESCE(sum(cost) FILTER (WHERE event_type = ANY(%(charged)s)), 0),
                   count(*) FILTER (WHERE event_type = ANY(%(spending)s)),
                   count(*)
              FROM ledger_events
             WHERE agent_id = %(agent)s
               AND ((occurred_at >= %(start)s AND occurred_at < %(first_hour)s)
                    OR (occurred_at >= %(last_hour)s AND occurred_at < %(end)s))
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
            "charged": [str(t) for t in CHARGED_EVENT_TYPES],
            "spending": [str(t) for t in SPENDING_EVENT_TYPES],
            **span_params(span(start, end)),
        },
    ).fetchall()
    return {r["currency"].strip(): (Decimal(r["total"]), int(r["spending"])) for r in rows}


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """Rows written by :func:`rebuild`."""

    hours: int
    days: int


def rebuild(conn: Connection, agent_id: uuid.UUID | None = None) -> Rebuilt:
    """Recompute the hourly and daily totals (of one agent, or all) from the events, in the caller's
    transaction. Only needed if events were changed behind the ledger's back."""
    where = "WHERE agent_id = %(agent)s" if agent_id is not None else ""
    params = {
        "agent": agent_id,
        "charged": [str(t) for t in CHARGED_EVENT_TYPES],
        "spending": [str(t) for t in SPENDING_EVENT_TYPES],
    }
    conn.execute(f"DELETE FROM spend_totals {where}", params)
    conn.execute(f"DELETE FROM spend_daily {where}", params)
    hours = conn.execute(
        f"""
        INSERT INTO spend_totals (agent_id, currency, bucket, total, spending_events, ledger_events)
        SELECT agent_id, currency, date_trunc('hour', occurred_at, 'UTC'),
               COALESCE(sum(cost) FILTER (WHERE event_type = ANY(%(charged)s)), 0),
               count(*) FILTER (WHERE event_type = ANY(%(spending)s)),
               count(*)
          FROM ledger_events {where}
         GROUP BY 1, 2, 3
        """,
        params,
    )
    days = conn.execute(
        f"""
        INSERT INTO spend_daily (agent_id, currency, day, total, spending_events, ledger_events)
        SELECT agent_id, currency, date_trunc('day', bucket, 'UTC'),
               sum(total), sum(spending_events), sum(ledger_events)
          FROM spend_totals {where}
         GROUP BY 1, 2, 3
        """,
        params,
    )
    return Rebuilt(max(hours.rowcount, 0), max(days.rowcount, 0))
