"""What the gateway reads from the store: bulk snapshots for its cache, and the operator switches."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from caracald.core.agents import Agent
from caracald.core.allowlist import PatternType
from caracald.core.policy import PolicyVersion
from caracald.core.pricebook import Pricebook
from caracald.store import agents as agent_store
from caracald.store import policies as policy_store
from caracald.store import pricebook as price_store
from caracald.store.allowlists import AllowlistEntry
from caracald.store.database import Connection

DENY_ALL = "deny_all"

#: More agents than any deployment is expected to have; the cache loads them all.
_MAX_AGENTS = 10_000_000


@dataclass(frozen=True, slots=True)
class StoreSnapshot:
    """Everything the gateway needs to decide a request, read in one transaction."""

    agents: list[Agent]
    credentials: dict[str, tuple[uuid.UUID, bytes]]
    policies: list[PolicyVersion]
    allowlists: list[AllowlistEntry]
    pricebook: Pricebook


@dataclass(frozen=True, slots=True)
class Switch:
    name: str
    enabled: bool
    reason: str
    set_by: str
    set_at: datetime


def load_snapshot(conn: Connection) -> StoreSnapshot:
    agents = agent_store.list_all(conn, limit=_MAX_AGENTS)
    rows = conn.execute(
        "SELECT key_id, agent_id, secret_hash FROM agent_credentials WHERE revoked_at IS NULL"
    ).fetchall()
    credentials = {r["key_id"]: (r["agent_id"], bytes(r["secret_hash"])) for r in rows}
    policies = policy_store.current_for_agents(conn, [a.agent_id for a in agents])
    entries = conn.execute(
        "SELECT allowlist_id, agent_id, pattern, pattern_type, status, created_by, created_at, deleted_at"
        " FROM allowlists WHERE status = 'active' ORDER BY created_at, allowlist_id"
    ).fetchall()
    allowlists = [AllowlistEntry(**{**r, "pattern_type": PatternType(r["pattern_type"])}) for r in entries]
    return StoreSnapshot(agents, credentials, policies, allowlists, price_store.load_pricebook(conn))


def get_switch(conn: Connection, name: str) -> Switch | None:
    row = conn.execute(
        "SELECT name, enabled, reason, set_by, set_at FROM gateway_switches WHERE name = %s", (name,)
    ).fetchone()
    return Switch(**row) if row else None


def set_switch(conn: Connection, name: str, enabled: bool, *, reason: str, actor: str, now: datetime) -> None:
    conn.execute(
        """
        INSERT INTO gateway_switches (name, enabled, reason, set_by, set_at) VALUES (%s, %s, %s, %s, %s)
        ON CONFLICT (name) DO UPDATE
           SET enabled = EXCLUDED.enabled, reason = EXCLUDED.reason, set_by = EXCLUDED.set_by,
               set_at = EXCLUDED.set_at
        """,
        (name, enabled, reason, actor, now),
    )


@dataclass(frozen=True, slots=True)
class ChargedEvent:
    occurred_at: datetime
    cost: Decimal
    currency: str
    policy_ids: tuple[uuid.UUID, ...]


def charged_since(conn: Connection, since: datetime) -> list[ChargedEvent]:
    """Every charge (settlement, expiry, adjustment) since ``since`` with the policies it counted against."""
    rows = conn.execute(
        """
        SELECT occurred_at, cost, currency, metadata -> 'policy_ids' AS policy_ids
          FROM ledger_events
         WHERE event_type IN ('settlement', 'expiry', 'adjustment') AND occurred_at >= %s
         ORDER BY event_id
        """,
        (since,),
    ).fetchall()
    return [
        ChargedEvent(
            r["occurred_at"],
            Decimal(r["cost"]),
            r["currency"].strip(),
            tuple(uuid.UUID(p) for p in r["policy_ids"] or ()),
        )
        for r in rows
    ]
