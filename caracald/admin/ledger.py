"""Spending queries over the ledger."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from caracald.admin.common import require_agent
from caracald.core.ledger import SpendingSummary
from caracald.core.windows import WindowSpec, window_bounds
from caracald.store import ledger as ledger_store
from caracald.store import policies as policy_store
from caracald.store.database import Database


def spending(db: Database, agent_id: uuid.UUID, start: datetime, end: datetime) -> list[SpendingSummary]:
    """Totals per currency in [start, end); one USD row of zero when nothing was spent."""
    with db.read() as conn:
        require_agent(conn, agent_id)
        totals = ledger_store.spending(conn, agent_id, start, end)
        if not totals:
            currencies = {p.terms.limit.currency for p in policy_store.current_for_agents(conn, [agent_id])}
            totals = {c: (Decimal(0), 0) for c in sorted(currencies or {"USD"})}
    return [
        SpendingSummary(agent_id, start, end, cur, total, count) for cur, (total, count) in totals.items()
    ]


def window_for_agent(
    db: Database, agent_id: uuid.UUID, spec: WindowSpec, at: datetime
) -> tuple[datetime, datetime]:
    bounds = window_bounds(spec, at)
    return bounds.start, bounds.end


def default_timezone(db: Database, agent_id: uuid.UUID, time_window: str) -> str:
    """The time zone of the agent's active policy on that window, so 'daily' means the policy's day."""
    with db.read() as conn:
        require_agent(conn, agent_id)
        for policy in policy_store.current_for_agents(conn, [agent_id]):
            if str(policy.terms.window.window) == time_window:
                return policy.terms.window.timezone
    return "UTC"
