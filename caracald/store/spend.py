"""Spend totals from the ledger, the source every budget counter can be rebuilt from."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from psycopg.rows import tuple_row

from caracald.core.ledger import CHARGED_EVENT_TYPES, LedgerEventType
from caracald.core.windows import WindowSpec
from caracald.store.database import Connection
from caracald.store.spend_totals import span, span_params

_CHARGED = [str(t) for t in CHARGED_EVENT_TYPES]


def charged_total(
    conn: Connection, agent_ids: Sequence[uuid.UUID], currency: str, start: datetime, end: datetime
) -> Decimal:
    """What the agents were charged in ``currency`` in [start, end).

    The whole UTC days inside the range come from ``spend_daily``, the whole hours around them from
    ``spend_totals``, the ragged ends (under an hour each) from the events: a month of a busy agent costs a
    few dozen rows, not its every event.
    """
    row = conn.execute(
        """
        SELECT (SELECT COALESCE(sum(total), 0) FROM spend_daily
                 WHERE agent_id = ANY(%(agents)s) AND currency = %(currency)s
                   AND day >= %(first_day)s AND day < %(last_day)s)
             + (SELECT COALESCE(sum(total), 0) FROM spend_totals
                 WHERE agent_id = ANY(%(agents)s) AND currency = %(currency)s
                   AND ((bucket >= %(first_hour)s AND bucket < %(first_day)s)
                        OR (bucket >= %(last_day)s AND bucket < %(last_hour)s)))
             + (SELECT COALESCE(sum(cost), 0) FROM ledger_events
                 WHERE agent_id = ANY(%(agents)s) AND currency = %(currency)s
                   AND event_type = ANY(%(charged)s)
                   AND ((occurred_at >= %(start)s AND occurred_at < %(first_hour)s)
                        OR (occurred_at >= %(last_hour)s AND occurred_at < %(end)s))) AS total
        """,
        {
            "agents": list(agent_ids),
            "currency": currency,
            "charged": _CHARGED,
            **span_params(span(start, end)),
        },
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
    """Holds the ledger shows as reserved since ``since`` and not yet settled or expired: (amount, count).

    As in :func:`policy_totals`, a request's events all carry its agent and its admission instant, so what
    closed a reservation lies in the same range of the (agent, time) index, read once: a NOT EXISTS per
    reservation is what the planner turns into a re-read of the range per reservation when the statistics
    do not show the recent events yet.
    """
    row = conn.execute(
        """
        SELECT COALESCE(sum(r.hold), 0) AS held, count(*) AS holds
          FROM (SELECT e.event_type, e.request_id, e.currency, (e.metadata->>'hold')::numeric AS hold,
                       bool_or(e.event_type = ANY(%(closing)s)) OVER (PARTITION BY e.request_id) AS closed
                  FROM ledger_events e
                 WHERE e.agent_id = ANY(%(agents)s) AND e.occurred_at >= %(since)s
                   AND (e.event_type = %(reservation)s OR e.event_type = ANY(%(closing)s))) r
         WHERE r.event_type = %(reservation)s AND r.currency = %(currency)s
           AND (r.request_id IS NULL OR NOT r.closed)
        """,
        {
            "reservation": str(LedgerEventType.RESERVATION),
            "closing": [str(LedgerEventType.SETTLEMENT), str(LedgerEventType.EXPIRY)],
            "agents": list(agent_ids),
            "currency": currency,
            "since": since,
        },
    ).fetchone()
    return (Decimal(row["held"]), int(row["holds"])) if row else (Decimal(0), 0)


def unclosed_reservations(conn: Connection, since: datetime) -> list[dict[str, Any]]:
    """Reservations since ``since`` that no settlement or expiry closed, oldest first: ``request_id``,
    ``agent_id``, ``occurred_at``, ``currency``, ``hold`` (Decimal) and ``policy_ids`` (a list of strings).

    Every event of a request carries its agent and its admission instant, so what closed a reservation is
    found through the (agent, time) index.
    """
    return conn.execute(
        """
        SELECT r.request_id, r.agent_id, r.occurred_at, r.currency, (r.metadata->>'hold')::numeric AS hold,
               COALESCE(r.metadata->'policy_ids', '[]'::jsonb) AS policy_ids
          FROM ledger_events r
         WHERE r.event_type = %(reservation)s AND r.occurred_at >= %(since)s
           AND r.request_id IS NOT NULL AND r.metadata ? 'hold'
           AND NOT EXISTS (SELECT 1 FROM ledger_events c
                            WHERE c.agent_id = r.agent_id AND c.occurred_at = r.occurred_at
                              AND c.request_id = r.request_id AND c.event_type = ANY(%(closing)s))
         ORDER BY r.occurred_at
        """,
        {
            "reservation": str(LedgerEventType.RESERVATION),
            "closing": [str(LedgerEventType.SETTLEMENT), str(LedgerEventType.EXPIRY)],
            "since": since,
        },
    ).fetchall()


def policy_totals(
    conn: Connection,
    windows: Sequence[tuple[WindowSpec, datetime, datetime]],
    holds_since: datetime,
) -> dict[uuid.UUID, tuple[Decimal, Decimal, int]]:
    """For every current active policy whose window is one of ``windows``, each ``(spec, start, end)``: what
    the policy's agent and every agent below it were charged in [start, end), and the holds they have open
    (reserved since ``holds_since`` and neither settled nor expired), as ``{policy_id: (settled, held,
    holds)}``.

    The same figures as :func:`charged_total` and :func:`open_reservations` per policy, in one statement
    whatever the number of policies. The policies are read here, joined with their window's bounds: the
    few distinct windows travel, not thousands of per-policy rows.
    """
    if not windows:
        return {}
    parts = [span(start, end) for _, start, end in windows]
    params = {
        "time_windows": [str(w[0].window) for w in windows],
        "window_types": [str(w[0].window_type) for w in windows],
        "timezones": [w[0].timezone for w in windows],
        "starts": [w[1] for w in windows],
        "ends": [w[2] for w in windows],
        "first_hours": [p.first_hour for p in parts],
        "first_days": [p.first_day for p in parts],
        "last_days": [p.last_day for p in parts],
        "last_hours": [p.last_hour for p in parts],
        "charged": _CHARGED,
        "since": holds_since,
        "reservation": str(LedgerEventType.RESERVATION),
        "closing": [str(LedgerEventType.SETTLEMENT), str(LedgerEventType.EXPIRY)],
    }
    with conn.cursor(row_factory=tuple_row) as cur:
        # Planned for the values at hand every time (about 2 ms): a generic plan cannot know that "since" is
        # a quarter of an hour ago, guesses a third of the ledger for it and reads the whole table for the
        # open holds (150 ms at 800,000 events, growing with the ledger). Prepared all the same: parsed once.
        # (The setting lasts this transaction: the server's "auto" would switch to a generic plan after five
        # runs if its estimate looked no worse.)
        cur.execute("SET LOCAL plan_cache_mode = force_custom_plan")
        rows = cur.execute(_POLICY_TOTALS, params, prepare=True).fetchall()
    return {policy_id: (settled, held, holds) for policy_id, settled, held, holds in rows}


# The scopes (current active policies with their window's bounds) and the agent tree under each are read
# once.
#
# Settled: per agent of each scope, the whole UTC days from the daily spend_daily, the whole hours around
# them from the hourly spend_totals and the ragged ends (under an hour each, see spend_totals.span) from the
# events, each a range scan of an (agent_id, time) index: the cost stays a few dozen rows per agent whatever
# the traffic and the window's length. A plain join of scopes with totals or events lets the
# planner hash whole tables instead.
#
# Held: the open holds are found once, per agent, then added up per scope. Every event of a request carries
# its admission instant as occurred_at, so a reservation's settlement or expiry, when there is one, also lies
# after ``since``. Whether a reservation was closed is read from its request's events in one pass over the
# recent events (a window per request) rather than with NOT EXISTS: with statistics that do not show the
# recent reservations yet (a young or just-filled ledger), the planner runs NOT EXISTS as a nested loop that
# re-reads the recent events once per reservation, minutes for a busy quarter of an hour.
_POLICY_TOTALS = """
    WITH RECURSIVE win AS (
        SELECT * FROM unnest(%(time_windows)s::text[], %(window_types)s::text[], %(timezones)s::text[],
                             %(starts)s::timestamptz[], %(ends)s::timestamptz[],
                             %(first_hours)s::timestamptz[], %(first_days)s::timestamptz[],
                             %(last_days)s::timestamptz[], %(last_hours)s::timestamptz[])
               AS w(time_window, window_type, timezone, start_at, end_at, first_hour, first_day, last_day,
                    last_hour)
    ), scope AS (
        SELECT v.policy_id, p.agent_id, v.currency::text AS currency,
               w.start_at, w.end_at, w.first_hour, w.first_day, w.last_day, w.last_hour
          FROM policies p
          JOIN policy_versions v ON v.policy_id = p.policy_id AND v.version = p.current_version
          JOIN win w ON w.time_window = v.time_window AND w.window_type = v.window_type
                    AND w.timezone = v.timezone
         WHERE v.status = 'active'
    ), tree(policy_id, agent_id) AS (
        SELECT policy_id, agent_id FROM scope
        UNION
        SELECT t.policy_id, a.agent_id FROM tree t JOIN agents a ON a.parent_id = t.agent_id
    ), pairs AS (
        SELECT s.policy_id, t.agent_id, s.currency, s.start_at, s.end_at, s.first_hour, s.first_day,
               s.last_day, s.last_hour
          FROM scope s
          JOIN tree t ON t.policy_id = s.policy_id
    ), settled AS (
        SELECT p.policy_id, sum(days.total + hours.total + edges.total) AS total
          FROM pairs p
          CROSS JOIN LATERAL (
                SELECT COALESCE(sum(sd.total), 0) AS total
                  FROM spend_daily sd
                 WHERE sd.agent_id = p.agent_id AND sd.currency = p.currency
                   AND sd.day >= p.first_day AND sd.day < p.last_day
                   AND p.first_day < p.last_day  -- (each empty part: no index scan at all)
          ) days
          CROSS JOIN LATERAL (
                -- two ranges of one index, each read on its own (one range over both would read the days);
                -- a window in UTC days (most are) has neither
                SELECT COALESCE(sum(h.total), 0) AS total
                  FROM (SELECT st.total FROM spend_totals st
                         WHERE st.agent_id = p.agent_id AND st.currency = p.currency
                           AND st.bucket >= p.first_hour AND st.bucket < p.first_day
                           AND p.first_hour < p.first_day
                        UNION ALL
                        SELECT st.total FROM spend_totals st
                         WHERE st.agent_id = p.agent_id AND st.currency = p.currency
                           AND st.bucket >= p.last_day AND st.bucket < p.last_hour
                           AND p.last_day < p.last_hour) h
          ) hours
          CROSS JOIN LATERAL (
                SELECT COALESCE(sum(e.cost), 0) AS total
                  FROM ledger_events e
                 WHERE e.agent_id = p.agent_id AND e.currency = p.currency
                   AND e.event_type = ANY(%(charged)s)
                   AND ((e.occurred_at >= p.start_at AND e.occurred_at < p.first_hour)
                        OR (e.occurred_at >= p.last_hour AND e.occurred_at < p.end_at))
                   -- an hour-aligned window (most are) has no ragged ends: no scan at all
                   AND (p.start_at < p.first_hour OR p.last_hour < p.end_at)
          ) edges
         GROUP BY p.policy_id
    ), open_holds AS MATERIALIZED (
        SELECT r.agent_id, r.currency, sum(r.hold) AS held, count(*) AS holds
          FROM (SELECT e.agent_id, e.currency::text AS currency, e.event_type, e.request_id,
                       (e.metadata->>'hold')::numeric AS hold,
                       bool_or(e.event_type = ANY(%(closing)s)) OVER (PARTITION BY e.request_id) AS closed
                  FROM ledger_events e
                 WHERE e.occurred_at >= %(since)s
                   AND (e.event_type = %(reservation)s OR e.event_type = ANY(%(closing)s))) r
         -- as with NOT EXISTS (the same request's settlement or expiry), one without a request id is open
         WHERE r.event_type = %(reservation)s AND (r.request_id IS NULL OR NOT r.closed)
         GROUP BY r.agent_id, r.currency
    ), held AS (
        SELECT p.policy_id, COALESCE(sum(h.held), 0) AS held, sum(h.holds) AS holds
          FROM pairs p
          JOIN open_holds h ON h.agent_id = p.agent_id AND h.currency = p.currency
         GROUP BY p.policy_id
    )
    SELECT s.policy_id, s.total, COALESCE(h.held, 0), COALESCE(h.holds, 0)::bigint
      FROM settled s
      LEFT JOIN held h ON h.policy_id = s.policy_id
"""
