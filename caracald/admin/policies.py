"""Budget policies: create, change (a new version), deactivate, list, history."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import cast

from caracald.admin.common import audit, now, require_active_agent, require_agent
from caracald.core.audit import AuditEventType
from caracald.core.errors import ConflictError, NotFoundError
from caracald.core.money import Money
from caracald.core.policy import (
    DelegatedPolicy,
    PolicyStatus,
    PolicyTerms,
    PolicyVersion,
    check_change_reason,
    check_covers_descendants,
    check_within_ancestors,
)
from caracald.core.windows import TimeWindow, WindowSpec, WindowType
from caracald.store import agents as agent_store
from caracald.store import policies as policy_store
from caracald.store.database import Connection, Database


def parse_terms(limit: str, currency: str, time_window: str, window_type: str, timezone: str) -> PolicyTerms:
    """Validate a policy's terms as a user typed them."""
    # WindowSpec turns the words into enums, refusing unknown ones with a message listing the choices
    spec = WindowSpec(cast(TimeWindow, time_window), cast(WindowType, window_type), timezone)
    return PolicyTerms(limit=Money.parse_limit(limit, currency), window=spec)


def _delegation_checks(
    conn: Connection, agent_id: uuid.UUID, terms: PolicyTerms, policy_id: uuid.UUID
) -> None:
    names = {}
    ancestors = agent_store.ancestors(conn, agent_id)
    if ancestors:
        names = {a.agent_id: a.name for a in ancestors}
        check_within_ancestors(
            terms,
            [
                DelegatedPolicy(names[p.agent_id], p.policy_id, p.terms)
                for p in policy_store.current_for_agents(conn, list(names))
            ],
        )
    descendants = agent_store.descendants(conn, agent_id)
    if descendants:
        names = {a.agent_id: a.name for a in descendants}
        check_covers_descendants(
            terms,
            [
                DelegatedPolicy(names[p.agent_id], p.policy_id, p.terms)
                for p in policy_store.current_for_agents(conn, list(names))
                if p.policy_id != policy_id
            ],
        )


def create_policy(
    db: Database, agent_id: uuid.UUID, terms: PolicyTerms, *, change_reason: str | None, actor: str
) -> PolicyVersion:
    reason = check_change_reason(change_reason)
    at = now()
    with db.transaction() as conn:
        require_active_agent(conn, agent_id)
        version = PolicyVersion(uuid.uuid4(), agent_id, 1, terms, PolicyStatus.ACTIVE, reason, actor, at)
        _delegation_checks(conn, agent_id, terms, version.policy_id)
        policy_store.insert_version(conn, version)
        audit(
            conn,
            actor=actor,
            event_type=AuditEventType.POLICY_CHANGE,
            action="policy.create",
            at=at,
            subject_id=version.policy_id,
            agent_id=agent_id,
            reason=reason,
            details=_details(version),
        )
    return version


def change_policy(
    db: Database, policy_id: uuid.UUID, *, limit: str | None, change_reason: str | None, actor: str
) -> PolicyVersion:
    """Write a new version with a new limit; earlier versions stay unchanged as history."""
    reason = check_change_reason(change_reason)
    at = now()
    with db.transaction() as conn:
        current = _require_policy(conn, policy_id)
        require_active_agent(conn, current.agent_id)
        if not current.is_active:
            raise ConflictError(f"policy {policy_id} is inactive")
        terms = current.terms
        if limit is not None:
            terms = replace(terms, limit=Money.parse_limit(limit, terms.limit.currency))
        version = replace(
            current,
            version=current.version + 1,
            terms=terms,
            change_reason=reason,
            changed_by=actor,
            created_at=at,
        )
        _delegation_checks(conn, current.agent_id, terms, policy_id)
        policy_store.insert_version(conn, version)
        audit(
            conn,
            actor=actor,
            event_type=AuditEventType.POLICY_CHANGE,
            action="policy.change",
            at=at,
            subject_id=policy_id,
            agent_id=current.agent_id,
            reason=reason,
            details={**_details(version), "previous_limit": current.terms.limit.decimal_string()},
        )
    return version


def deactivate_policy(
    db: Database, policy_id: uuid.UUID, *, change_reason: str | None, actor: str
) -> PolicyVersion:
    reason = check_change_reason(change_reason)
    at = now()
    with db.transaction() as conn:
        current = _require_policy(conn, policy_id)
        if not current.is_active:
            raise ConflictError(f"policy {policy_id} is already inactive")
        version = replace(
            current,
            version=current.version + 1,
            status=PolicyStatus.INACTIVE,
            change_reason=reason,
            changed_by=actor,
            created_at=at,
        )
        policy_store.insert_version(conn, version)
        audit(
            conn,
            actor=actor,
            event_type=AuditEventType.POLICY_CHANGE,
            action="policy.deactivate",
            at=at,
            subject_id=policy_id,
            agent_id=current.agent_id,
            reason=reason,
            details=_details(version),
        )
    return version


def _require_policy(conn: Connection, policy_id: uuid.UUID) -> PolicyVersion:
    current = policy_store.current(conn, policy_id, for_update=True)
    if current is None:
        raise NotFoundError(f"policy {policy_id} not found")
    return current


def list_policies(
    db: Database, agent_id: uuid.UUID, *, include_inactive: bool = False
) -> list[PolicyVersion]:
    with db.read() as conn:
        require_agent(conn, agent_id)
        return policy_store.current_for_agents(conn, [agent_id], active_only=not include_inactive)


def policy_history(
    db: Database, agent_id: uuid.UUID, policy_id: uuid.UUID | None = None
) -> list[PolicyVersion]:
    with db.read() as conn:
        require_agent(conn, agent_id)
        return policy_store.history(conn, agent_id, policy_id)


def _details(version: PolicyVersion) -> dict[str, str | int]:
    terms = version.terms
    return {
        "version": version.version,
        "limit": terms.limit.decimal_string(),  # plain text: normalize() would give "1E+2" for 100
        "currency": terms.limit.currency,
        "time_window": str(terms.window.window),
        "window_type": str(terms.window.window_type),
        "timezone": terms.window.timezone,
        "status": str(version.status),
    }
