"""Reading and checking the audit log."""

from __future__ import annotations

import uuid
from datetime import datetime

from caracald.core.audit import AuditEventType
from caracald.core.errors import ValidationError
from caracald.store import audit as audit_store
from caracald.store.audit import AuditRecord, ChainCheck
from caracald.store.database import Database


def parse_event_types(text: str | None) -> list[str]:
    if not text:
        return []
    wanted = [t.strip().lower() for t in text.split(",") if t.strip()]
    valid = {str(t) for t in AuditEventType}
    unknown = [t for t in wanted if t not in valid]
    if unknown:
        raise ValidationError(f"unknown event type {', '.join(unknown)}: use {', '.join(sorted(valid))}")
    return wanted


def query(
    db: Database,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    event_types: list[str] | None = None,
    agent_id: uuid.UUID | None = None,
    limit: int = 1000,
) -> list[AuditRecord]:
    if start and end and end < start:
        raise ValidationError("end time must not be before start time")
    with db.read() as conn:
        return audit_store.query(
            conn,
            start=start,
            end=end,
            event_types=event_types or [],
            agent_id=str(agent_id) if agent_id else None,
            limit=limit,
        )


def verify(db: Database) -> ChainCheck:
    with db.read() as conn:
        return audit_store.verify_chain(conn)
