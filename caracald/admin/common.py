"""Helpers shared by the administrative use cases."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from caracald.core.agents import Agent
from caracald.core.audit import AuditEntry, AuditEventType
from caracald.core.errors import ConflictError, NotFoundError
from caracald.store import agents as agent_store
from caracald.store import audit as audit_store
from caracald.store.database import Connection


def now() -> datetime:
    return datetime.now(UTC)


def require_agent(conn: Connection, agent_id: uuid.UUID, *, for_update: bool = False) -> Agent:
    agent = agent_store.get(conn, agent_id, for_update=for_update)
    if agent is None:
        raise NotFoundError(f"agent {agent_id} not found")
    return agent


def require_active_agent(conn: Connection, agent_id: uuid.UUID) -> Agent:
    agent = require_agent(conn, agent_id, for_update=True)
    if not agent.is_active:
        raise ConflictError(f"agent {agent_id} ({agent.name}) is suspended: activate it before changing it")
    return agent


def audit(
    conn: Connection,
    *,
    actor: str,
    event_type: AuditEventType,
    action: str,
    at: datetime,
    subject_id: object | None = None,
    agent_id: object | None = None,
    reason: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    audit_store.append(
        conn,
        AuditEntry(
            occurred_at=at,
            actor=actor,
            event_type=event_type,
            action=action,
            subject_id=str(subject_id) if subject_id is not None else None,
            agent_id=str(agent_id) if agent_id is not None else None,
            reason=reason,
            details=details or {},
        ),
    )
