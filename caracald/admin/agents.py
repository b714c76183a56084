"""Agent lifecycle: create, suspend, activate, rotate keys."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import psycopg

from caracald.admin.common import audit, now, require_agent
from caracald.core.agents import Agent, AgentStatus, check_agent_name, check_owner
from caracald.core.audit import AuditEventType
from caracald.core.credentials import issue_key
from caracald.core.errors import ConflictError, NotFoundError, ValidationError
from caracald.store import agents as agent_store
from caracald.store.database import Database


@dataclass(frozen=True, slots=True)
class NewCredential:
    agent: Agent
    api_key: str  # shown once, never stored

    def __repr__(self) -> str:
        return f"NewCredential(agent={self.agent.agent_id}, api_key='***')"


def create_agent(
    db: Database,
    *,
    name: str,
    owner: str,
    actor: str,
    description: str = "",
    parent_id: uuid.UUID | None = None,
) -> NewCredential:
    name = check_agent_name(name)
    owner = check_owner(owner)
    if len(description) > 2000:
        raise ValidationError("description must be at most 2000 characters")
    at = now()
    agent = Agent(uuid.uuid4(), name, description, owner, parent_id, AgentStatus.ACTIVE, at, at)
    key = issue_key()
    try:
        with db.transaction() as conn:
            if parent_id is not None:
                parent = agent_store.get(conn, parent_id, for_update=True)
                if parent is None:
                    raise NotFoundError(f"parent agent {parent_id} not found")
                if not parent.is_active:
                    raise ConflictError(f"parent agent {parent_id} ({parent.name}) is suspended")
            agent_store.insert(conn, agent)
            agent_store.insert_credential(conn, agent.agent_id, key.key_id, key.secret_hash, at)
            audit(
                conn,
                actor=actor,
                event_type=AuditEventType.AGENT_LIFECYCLE,
                action="agent.create",
                at=at,
                subject_id=agent.agent_id,
                agent_id=agent.agent_id,
                details={
                    "name": name,
                    "owner": owner,
                    "parent_id": str(parent_id) if parent_id else None,
                    "key_id": key.key_id,
                },
            )
    except psycopg.errors.UniqueViolation:
        raise ConflictError(f"an agent named {name!r} already exists") from None
    return NewCredential(agent, key.api_key)


def get_agent(db: Database, agent_id: uuid.UUID) -> Agent:
    with db.read() as conn:
        return require_agent(conn, agent_id)


def list_agents(db: Database, *, status: AgentStatus | None = None) -> list[Agent]:
    with db.read() as conn:
        return agent_store.list_all(conn, status=status)


def set_status(
    db: Database, agent_id: uuid.UUID, status: AgentStatus, *, actor: str, reason: str | None
) -> tuple[Agent, bool]:
    """Suspend or activate. Returns the agent and whether anything changed (doing it twice is a no-op)."""
    at = now()
    with db.transaction() as conn:
        agent = require_agent(conn, agent_id, for_update=True)
        if agent.status is status:
            return agent, False
        agent_store.set_status(conn, agent_id, status, at)
        action = "agent.suspend" if status is AgentStatus.SUSPENDED else "agent.activate"
        audit(
            conn,
            actor=actor,
            event_type=AuditEventType.AGENT_LIFECYCLE,
            action=action,
            at=at,
            subject_id=agent_id,
            agent_id=agent_id,
            reason=reason,
            details={"from": str(agent.status), "to": str(status)},
        )
        return require_agent(conn, agent_id), True


def rotate_key(db: Database, agent_id: uuid.UUID, *, actor: str, reason: str | None = None) -> NewCredential:
    """Revoke the agent's key and issue a new one; the old key stops working at once."""
    at = now()
    key = issue_key()
    with db.transaction() as conn:
        agent = require_agent(conn, agent_id, for_update=True)
        revoked = agent_store.revoke_credentials(conn, agent_id, at)
        agent_store.insert_credential(conn, agent_id, key.key_id, key.secret_hash, at)
        audit(
            conn,
            actor=actor,
            event_type=AuditEventType.CREDENTIAL,
            action="agent.rotate_key",
            at=at,
            subject_id=agent_id,
            agent_id=agent_id,
            reason=reason,
            details={"key_id": key.key_id, "revoked": revoked},
        )
    return NewCredential(agent, key.api_key)
