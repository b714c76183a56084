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


def scope_totals(
    conn: Connection,
    scopes: Sequence[tuple[uuid.UUID, uuid.UUID, str, datetime, datetime]],
    holds_since: datetime,
) -> dict[uuid.UUID, tuple[Decimal, Decimal, int]]:
    """For many scopes at once, each ``(policy_id, agent_id, currency, start, end)``: what the policy's agent
    and every agent below it were charged in [start, end), and the holds they have open (reserved since
    ``holds_since`` and neither settled nor expired), as ``{policy_id: (settled, held, holds)}``.

    The same figures as :func:`charged_total` and :func:`open_reservations` per scope, in two statements
    whatever the number of scopes.
    """
    if not scopes:
        return {}
    params = {
        "policies": [s[0] for s in scopes],
        "agents": [s[1] for s in scopes],
        "currencies": [s[2] for s in scopes],
        "starts": [s[3] for s in scopes],
        "ends": [s[4] for s in scopes],
        "charged": _CHARGED,
        "since": holds_since,
        "reservation": str(LedgerEventType.RESERVATION),
        "closing": [str(LedgerEventType.SETTLEMENT), str(LedgerEventType.EXPIRY)],
    }
    tree = """
        WITH RECURSIVE scope AS (
            SELECT * FROM unnest(%(policies)s::uuid[], %(agents)s::uuid[], %(currencies)s::text[],
                                 %(starts)s::timestamptz[], %(ends)s::timestamptz[])
                   AS s(policy_id, agent_id, currency, start_at, end_at)
        ), tree(policy_id, agent_id) AS (
            SELECT policy_id, agent_id FROM scope
            UNION
            SELECT t.policy_id, a.agent_id FROM tree t JOIN agents a ON a.parent_id = t.agent_id
        )
    """
    # LATERAL: one range scan of (agent_id, occurred_at) per agent of each scope. A plain join lets the
    # planner join every scope with every event of the currency first, which is quadratic.
    settled = conn.execute(
        tree
        + """
        SELECT s.policy_id, sum(x.total) AS total
          FROM scope s
          JOIN tree t ON t.policy_id = s.policy_id
          CROSS JOIN LATERAL (
                SELECT COALESCE(sum(e.cost), 0) AS total
                  FROM ledger_events e
                 WHERE e.agent_id = t.agent_id AND e.currency = s.currency
                   AND e.event_type = ANY(%(charged)s)
                   AND e.occurred_at >= s.start_at AND e.occurred_at < s.end_at
          ) x
         GROUP BY s.policy_id
        """,
        params,
    ).fetchall()
    # Every event of a request carries its admission instant as occurred_at, so a reservation's settlement
    # or expiry, when there is one, also lies after ``holds_since``.
    held = conn.execute(
        tree
        + """
        , open_holds AS (
            SELECT r.agent_id, r.currency, (r.metadata->>'hold')::numeric AS hold
              FROM ledger_events r
             WHERE r.event_type = %(reservation)s AND r.occurred_at >= %(since)s
               AND NOT EXISTS (
                   SELECT 1 FROM ledger_events o
                    WHERE o.request_id = r.request_id AND o.event_type = ANY(%(closing)s)
                      AND o.occurred_at >= %(since)s)
        )
        SELECT s.policy_id, COALESCE(sum(h.hold), 0) AS held, count(*) AS holds
          FROM scope s
          JOIN tree t ON t.policy_id = s.policy_id
          JOIN open_holds h ON h.agent_id = t.agent_id AND h.currency = s.currency
         GROUP BY s.policy_id
        """,
        params,
    ).fetchall()
    out = {s[0]: (Decimal(0), Decimal(0), 0) for s in scopes}
    for r in settled:
        out[r["policy_id"]] = (Decimal(r["total"]), Decimal(0), 0)
    for r in held:
        total = out[r["policy_id"]][0]
        out[r["policy_id"]] = (total, Decimal(r["held"]), int(r["holds"]))
    return out
