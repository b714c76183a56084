"""Spending queries over the ledger."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from caracald.admin.common import require_agent
from caracald.core.errors import ValidationError
from caracald.core.ledger import SpendingSummary
from caracald.core.windows import WindowSpec, window_bounds
from caracald.store import ledger as ledger_store
from caracald.store import policies as policy_store
from caracald.store import spend_totals
from caracald.store.database import Database
from caracald.store.ledger import StoredEvent


def spending(db: Database, agent_id: uuid.UUID, start: datetime, end: datetime) -> list[SpendingSummary]:
    """Totals per currency in [start, end); one USD row of zero when nothing was spent.

    Read from the hourly ``spend_totals`` plus the events of the partial hours at either end: exactly what
    summing the events gives, in milliseconds whatever the range.
    """
    with db.read() as conn:
        require_agent(conn, agent_id)
        totals = spend_totals.spending(conn, agent_id, start, end)
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


def events(
    db: Database, agent_id: uuid.UUID | None, start: datetime, end: datetime, *, limit: int = 500
) -> list[StoredEvent]:
    """Ledger events that occurred in [start, end), newest first: one agent's, or every agent's."""
    if end <= start:
        raise ValidationError("end time must be after start time")
    if limit < 1:
        raise ValidationError("limit must be at least 1")
    with db.read() as conn:
        if agent_id is not None:
            require_agent(conn, agent_id)
        return ledger_store.list_events(conn, agent_id=agent_id, start=start, end=end, limit=limit)
