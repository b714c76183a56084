"""Audit records and their hash chain.

Each record's hash covers its canonical JSON and the previous record's hash, so removing, changing or
reordering any record breaks every hash after it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

GENESIS_HASH = bytes(32)


class AuditEventType(StrEnum):
    AGENT_LIFECYCLE = "agent_lifecycle"
    CREDENTIAL = "credential"
    POLICY_CHANGE = "policy_change"
    ALLOWLIST_CHANGE = "allowlist_change"
    PRICEBOOK_CHANGE = "pricebook_change"
    DATABASE = "database"
    OPS_PROCEDURE = "ops_procedure"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """What happened, before it is chained."""

    occurred_at: datetime
    actor: str
    event_type: AuditEventType
    action: str
    subject_id: str | None = None
    agent_id: str | None = None
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def canonical(self) -> bytes:
        body = {
            "occurred_at": self.occurred_at.astimezone(UTC).isoformat(),
            "actor": self.actor,
            "event_type": str(self.event_type),
            "action": self.action,
            "subject_id": self.subject_id,
            "agent_id": self.agent_id,
            "reason": self.reason,
            "details": self.details,
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(prev_hash: bytes, entry: AuditEntry) -> bytes:
    return hashlib.sha256(prev_hash + entry.canonical()).digest()
