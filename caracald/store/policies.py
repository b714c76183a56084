"""Policies and their immutable versions."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from typing import Any

from caracald.core.money import Money
from caracald.core.policy import PolicyStatus, PolicyTerms, PolicyVersion
from caracald.core.windows import WindowSpec
from caracald.store.database import Connection

_SELECT = """
    SELECT v.policy_id, p.agent_id, v.version, v.limit_amount, v.currency, v.time_window, v.window_type,
           v.timezone, v.status, v.change_reason, v.changed_by, v.created_at
      FROM policy_versions v JOIN policies p ON p.policy_id = v.policy_id
"""


@functools.lru_cache(maxsize=1024)
def _window(window: str, window_type: str, timezone: str) -> WindowSpec:
    # Immutable, and a handful of distinct ones however many policies: validated once, shared.
    return WindowSpec(window, window_type, timezone)  # type: ignore[arg-type]


def _version(row: dict[str, Any]) -> PolicyVersion:
    return PolicyVersion(
        policy_id=row["policy_id"],
        agent_id=row["agent_id"],
        version=row["version"],
        terms=PolicyTerms(
            limit=Money(row["limit_amount"], row["currency"]),
            window=_window(row["time_window"], row["window_type"], row["timezone"]),
        ),
        status=PolicyStatus(row["status"]),
        change_reason=row["change_reason"],
        changed_by=row["changed_by"],
        created_at=row["created_at"],
    )


def insert_version(conn: Connection, version: PolicyVersion) -> None:
    if version.version == 1:
        conn.execute(
            "INSERT INTO policies (policy_id, agent_id, current_version, created_at) VALUES (%s, %s, 1, %s)",
            (version.policy_id, version.agent_id, version.created_at),
        )
    else:
        conn.execute(
            "UPDATE policies SET current_version = %s WHERE policy_id = %s",
            (version.version, version.policy_id),
        )
    terms = version.terms
    conn.execute(
        """
        INSERT INTO policy_versions (policy_id, version, limit_amount, currency, time_window, window_type,
                                     timezone, status, change_reason, changed_by, created_at)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
        """,
        (
            version.policy_id,
            version.version,
            terms.limit.amount,
            terms.limit.currency,
            str(terms.window.window),
            str(terms.window.window_type),
            terms.window.timezone,
            str(version.status),
            version.change_reason,
            version.changed_by,
            version.created_at,
        ),
    )


def current(conn: Connection, policy_id: uuid.UUID, *, for_update: bool = False) -> PolicyVersion | None:
    if for_update:
        conn.execute("SELECT 1 FROM policies WHERE policy_id = %s FOR UPDATE", (policy_id,))
    row = conn.execute(
        _SELECT + " WHERE v.policy_id = %s AND v.version = p.current_version", (policy_id,)
    ).fetchone()
    return _version(row) if row else None


def current_for_agents(
    conn: Connection, agent_ids: Sequence[uuid.UUID], *, active_only: bool = True
) -> list[PolicyVersion]:
    """The current version of every policy of the given agents."""
    status = " AND v.status = 'active'" if active_only else ""
    rows = conn.execute(
        _SELECT
        + " WHERE p.agent_id = ANY(%s) AND v.version = p.current_version"
        + status
        + " ORDER BY p.created_at, v.policy_id",
        (list(agent_ids),),
    ).fetchall()
    return [_version(r) for r in rows]


def current_all(conn: Connection) -> list[PolicyVersion]:
    """The current version of every active policy, of every agent."""
    rows = conn.execute(
        _SELECT
        + " WHERE v.version = p.current_version AND v.status = 'active' ORDER BY p.created_at, v.policy_id"
    ).fetchall()
    return [_version(r) for r in rows]


def history(conn: Connection, agent_id: uuid.UUID, policy_id: uuid.UUID | None = None) -> list[PolicyVersion]:
    if policy_id is None:
        rows = conn.execute(
            _SELECT + " WHERE p.agent_id = %s ORDER BY v.created_at, v.policy_id, v.version", (agent_id,)
        ).fetchall()
    else:
        rows = conn.execute(
            _SELECT + " WHERE p.agent_id = %s AND v.policy_id = %s ORDER BY v.version",
            (agent_id, policy_id),
        ).fetchall()
    return [_version(r) for r in rows]
