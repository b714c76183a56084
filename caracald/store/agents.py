"""Agents and their credentials."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from caracald.core.agents import Agent, AgentStatus
from caracald.store.database import Connection

_COLUMNS = "agent_id, name, description, owner, parent_id, status, created_at, updated_at"


def _agent(row: dict[str, Any]) -> Agent:
    return Agent(
        agent_id=row["agent_id"],
        name=row["name"],
        description=row["description"],
        owner=row["owner"],
        parent_id=row["parent_id"],
        status=AgentStatus(row["status"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def insert(conn: Connection, agent: Agent) -> None:
    conn.execute(
        f"INSERT INTO agents ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (
            agent.agent_id,
            agent.name,
            agent.description,
            agent.owner,
            agent.parent_id,
            str(agent.status),
            agent.created_at,
            agent.updated_at,
        ),
    )


def get(conn: Connection, agent_id: uuid.UUID, *, for_update: bool = False) -> Agent | None:
    lock = " FOR UPDATE" if for_update else ""
    row = conn.execute(f"SELECT {_COLUMNS} FROM agents WHERE agent_id = %s{lock}", (agent_id,)).fetchone()
    return _agent(row) if row else None


def get_by_name(conn: Connection, name: str) -> Agent | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM agents WHERE name = %s", (name,)).fetchone()
    return _agent(row) if row else None


def list_all(conn: Connection, *, status: AgentStatus | None = None, limit: int = 10_000) -> list[Agent]:
    if status is None:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM agents ORDER BY created_at, name LIMIT %s",
            (limit,),
        ).fetchall()
    else:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM agents WHERE status = %s ORDER BY created_at, name LIMIT %s",
            (str(status), limit),
        ).fetchall()
    return [_agent(r) for r in rows]


def set_status(conn: Connection, agent_id: uuid.UUID, status: AgentStatus, now: datetime) -> None:
    conn.execute(
        "UPDATE agents SET status = %s, updated_at = %s WHERE agent_id = %s", (str(status), now, agent_id)
    )


def ancestors(conn: Connection, agent_id: uuid.UUID) -> list[Agent]:
    """The delegation chain above an agent, nearest parent first."""
    rows = conn.execute(
        f"""
        WITH RECURSIVE chain AS (
            SELECT a.*, 0 AS depth FROM agents a
             WHERE a.agent_id = (SELECT parent_id FROM agents WHERE agent_id = %s)
            UNION ALL
            SELECT p.*, c.depth + 1 FROM agents p JOIN chain c ON p.agent_id = c.parent_id
             WHERE c.depth < 64
        )
        SELECT {_COLUMNS} FROM chain ORDER BY depth
        """,
        (agent_id,),
    ).fetchall()
    return [_agent(r) for r in rows]


def descendants(conn: Connection, agent_id: uuid.UUID) -> list[Agent]:
    rows = conn.execute(
        f"""
        WITH RECURSIVE tree AS (
            SELECT a.*, 1 AS depth FROM agents a WHERE a.parent_id = %s
            UNION ALL
            SELECT c.*, t.depth + 1 FROM agents c JOIN tree t ON c.parent_id = t.agent_id
             WHERE t.depth < 64
        )
        SELECT {_COLUMNS} FROM tree ORDER BY depth, name
        """,
        (agent_id,),
    ).fetchall()
    return [_agent(r) for r in rows]


# -- credentials ------------------------------------------------------------------------------------


def insert_credential(
    conn: Connection, agent_id: uuid.UUID, key_id: str, secret_hash: bytes, now: datetime
) -> uuid.UUID:
    credential_id = uuid.uuid4()
    conn.execute(
        """
        INSERT INTO agent_credentials (credential_id, agent_id, key_id, secret_hash, created_at)
        VALUES (%s, %s, %s, %s, %s)
        """,
        (credential_id, agent_id, key_id, secret_hash, now),
    )
    return credential_id


def revoke_credentials(conn: Connection, agent_id: uuid.UUID, now: datetime) -> int:
    cur = conn.execute(
        "UPDATE agent_credentials SET revoked_at = %s WHERE agent_id = %s AND revoked_at IS NULL",
        (now, agent_id),
    )
    return cur.rowcount


def live_credential(conn: Connection, key_id: str) -> tuple[uuid.UUID, bytes] | None:
    """(agent id, secret hash) of the unrevoked credential with this key id."""
    row = conn.execute(
        "SELECT agent_id, secret_hash FROM agent_credentials WHERE key_id = %s AND revoked_at IS NULL",
        (key_id,),
    ).fetchone()
    return (row["agent_id"], bytes(row["secret_hash"])) if row else None
