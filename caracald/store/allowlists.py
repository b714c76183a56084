"""Allowlist entries of agents."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from caracald.core.allowlist import PatternType
from caracald.store.database import Connection


@dataclass(frozen=True, slots=True)
class AllowlistEntry:
    allowlist_id: uuid.UUID
    agent_id: uuid.UUID
    pattern: str
    pattern_type: PatternType
    status: str
    created_by: str
    created_at: datetime
    deleted_at: datetime | None


_COLUMNS = "allowlist_id, agent_id, pattern, pattern_type, status, created_by, created_at, deleted_at"


def _entry(row: dict[str, Any]) -> AllowlistEntry:
    return AllowlistEntry(**{**row, "pattern_type": PatternType(row["pattern_type"])})


def insert(conn: Connection, entry: AllowlistEntry) -> None:
    conn.execute(
        f"INSERT INTO allowlists ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (
            entry.allowlist_id,
            entry.agent_id,
            entry.pattern,
            str(entry.pattern_type),
            entry.status,
            entry.created_by,
            entry.created_at,
            entry.deleted_at,
        ),
    )


def get(conn: Connection, allowlist_id: uuid.UUID) -> AllowlistEntry | None:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM allowlists WHERE allowlist_id = %s",
        (allowlist_id,),
    ).fetchone()
    return _entry(row) if row else None


def for_agent(
    conn: Connection, agent_id: uuid.UUID, *, include_deleted: bool = False
) -> list[AllowlistEntry]:
    status = "" if include_deleted else " AND status = 'active'"
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM allowlists WHERE agent_id = %s{status} ORDER BY created_at, allowlist_id",
        (agent_id,),
    ).fetchall()
    return [_entry(r) for r in rows]


def mark_deleted(conn: Connection, allowlist_id: uuid.UUID, now: datetime) -> bool:
    cur = conn.execute(
        "UPDATE allowlists SET status = 'deleted', deleted_at = %s"
        " WHERE allowlist_id = %s AND status = 'active'",
        (now, allowlist_id),
    )
    return cur.rowcount == 1
