"""Resource allowlists: create, list, test, delete."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from caracald.admin.common import audit, now, require_active_agent, require_agent
from caracald.core.allowlist import Allowlist, AllowlistRule, PatternType, compile_pattern, normalise_resource
from caracald.core.audit import AuditEventType
from caracald.core.errors import NotFoundError, ValidationError
from caracald.store import allowlists as allowlist_store
from caracald.store.allowlists import AllowlistEntry
from caracald.store.database import Database


def _pattern_type(value: str) -> PatternType:
    try:
        return PatternType(value.strip().lower())
    except ValueError:
        raise ValidationError(f"unknown pattern type {value!r}: use regex or glob") from None


def create_entry(
    db: Database, agent_id: uuid.UUID, pattern: str, pattern_type: str, *, actor: str
) -> AllowlistEntry:
    kind = _pattern_type(pattern_type)
    compile_pattern(pattern, kind)  # refuse an invalid pattern before anything is written
    at = now()
    entry = AllowlistEntry(uuid.uuid4(), agent_id, pattern, kind, "active", actor, at, None)
    with db.transaction() as conn:
        require_active_agent(conn, agent_id)
        allowlist_store.insert(conn, entry)
        audit(
            conn,
            actor=actor,
            event_type=AuditEventType.ALLOWLIST_CHANGE,
            action="allowlist.create",
            at=at,
            subject_id=entry.allowlist_id,
            agent_id=agent_id,
            details={"pattern": pattern, "pattern_type": str(kind)},
        )
    return entry


def list_entries(db: Database, agent_id: uuid.UUID, *, include_deleted: bool = False) -> list[AllowlistEntry]:
    with db.read() as conn:
        require_agent(conn, agent_id)
        return allowlist_store.for_agent(conn, agent_id, include_deleted=include_deleted)


@dataclass(frozen=True, slots=True)
class AllowlistCheck:
    resource: str
    allowed: bool
    matched: AllowlistEntry | None
    active_entries: int


def check_resource(db: Database, agent_id: uuid.UUID, resource: str) -> AllowlistCheck:
    normalised = normalise_resource(resource)
    with db.read() as conn:
        require_agent(conn, agent_id)
        entries = allowlist_store.for_agent(conn, agent_id)
    allowlist = Allowlist(AllowlistRule(str(e.allowlist_id), e.pattern, e.pattern_type) for e in entries)
    rule = allowlist.match(normalised)
    matched = next((e for e in entries if rule is not None and str(e.allowlist_id) == rule.rule_id), None)
    return AllowlistCheck(normalised, matched is not None, matched, len(entries))


def delete_entry(db: Database, allowlist_id: uuid.UUID, *, actor: str) -> AllowlistEntry:
    at = now()
    with db.transaction() as conn:
        entry = allowlist_store.get(conn, allowlist_id)
        if entry is None or entry.status != "active":
            raise NotFoundError(f"allowlist entry {allowlist_id} not found or already deleted")
        allowlist_store.mark_deleted(conn, allowlist_id, at)
        audit(
            conn,
            actor=actor,
            event_type=AuditEventType.ALLOWLIST_CHANGE,
            action="allowlist.delete",
            at=at,
            subject_id=allowlist_id,
            agent_id=entry.agent_id,
            details={"pattern": entry.pattern, "pattern_type": str(entry.pattern_type)},
        )
        return allowlist_store.get(conn, allowlist_id) or entry
