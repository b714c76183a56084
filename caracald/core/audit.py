"""Audit records and their hash chain; audit events, the envelope that carries them on the bus.

Each record's hash covers its canonical JSON and the previous record's hash, so removing, changing or
reordering any record breaks every hash after it.

In the distributed deployment the gateway and the ops procedures emit :class:`AuditEvent` s to
``caracal.audit.events`` (:func:`encode_event`; see :mod:`caracald.bus.audit` for the producer), and the
audit logger appends them to the chain (:func:`decode_event`), each event id once.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from caracald.core.events import EventDecodeError, UnknownSchemaVersionError

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


# --------------------------------------------------------------------------- audit events on the bus

#: Version of the audit event envelope on ``caracal.audit.events``.
AUDIT_SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """An audit entry travelling on the bus to the audit logger (the distributed deployment).

    ``event_id`` is chosen once, when the event is made, and travels with every retry and replay: the audit
    logger appends an event id at most once. CLI changes do not use this path: they write their audit
    record directly, in the transaction of the change itself.
    """

    event_id: uuid.UUID
    entry: AuditEntry

    @classmethod
    def new(cls, entry: AuditEntry) -> AuditEvent:
        return cls(uuid.uuid4(), entry)

    @property
    def key(self) -> bytes:
        """The partition key: one actor's events stay in order."""
        return self.entry.actor.encode()


def encode_event(event: AuditEvent) -> bytes:
    entry = event.entry
    body = {
        "schema_version": AUDIT_SCHEMA_VERSION,
        "event_id": str(event.event_id),
        "occurred_at": entry.occurred_at.astimezone(UTC).isoformat(),
        "actor": entry.actor,
        "event_type": str(entry.event_type),
        "action": entry.action,
        "subject_id": entry.subject_id,
        "agent_id": entry.agent_id,
        "reason": entry.reason,
        "details": entry.details,
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _optional_text(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise EventDecodeError(f"malformed audit event: {name} is not a string")
    return value


def _storable(node: Any) -> bool:
    if isinstance(node, str):
        if "\x00" in node:
            return False
        try:
            node.encode()
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(node, dict):
        return all(_storable(k) and _storable(v) for k, v in node.items())
    if isinstance(node, list):
        return all(_storable(v) for v in node)
    return True


def decode_event(payload: bytes) -> AuditEvent:
    """The audit event in ``payload``; raises :class:`~caracald.core.events.EventDecodeError` (or
    :class:`~caracald.core.events.UnknownSchemaVersionError`) when it is not one."""
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # also integers of too many digits, nesting too deep
        raise EventDecodeError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise EventDecodeError("not a JSON object")
    version = body.get("schema_version")
    if version != AUDIT_SCHEMA_VERSION:
        raise UnknownSchemaVersionError(f"audit schema version {version!r} is not {AUDIT_SCHEMA_VERSION}")
    try:
        event_id = uuid.UUID(body["event_id"])
        occurred_at = datetime.fromisoformat(body["occurred_at"])
        actor = body["actor"]
        action = body["action"]
        event_type = AuditEventType(body["event_type"])
        details = body.get("details") or {}
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise EventDecodeError(f"malformed audit event: {exc!r}") from None
    if occurred_at.tzinfo is None:
        raise EventDecodeError("malformed audit event: occurred_at has no time zone")
    try:  # the chain hashes the UTC instant: one before year 1 or after 9999 in UTC has none
        occurred_at.astimezone(UTC)
    except OverflowError:
        raise EventDecodeError("malformed audit event: occurred_at is out of range in UTC") from None
    if not isinstance(actor, str) or not actor or not isinstance(action, str) or not action:
        raise EventDecodeError("malformed audit event: actor and action must be non-empty strings")
    if not isinstance(details, dict):
        raise EventDecodeError("malformed audit event: details is not an object")
    try:
        storable = _storable(body)
    except RecursionError:
        raise EventDecodeError("malformed audit event: nested too deeply") from None
    if not storable:
        # PostgreSQL text and jsonb hold neither NUL nor lone surrogates: it could never be stored
        raise EventDecodeError("malformed audit event: a string holds a NUL or a lone surrogate")
    agent_id = _optional_text(body, "agent_id")
    if agent_id is not None:
        try:
            agent_id = str(uuid.UUID(agent_id))
        except ValueError:
            raise EventDecodeError(f"malformed audit event: agent_id {agent_id!r} is not a UUID") from None
    entry = AuditEntry(
        occurred_at=occurred_at,
        actor=actor,
        event_type=event_type,
        action=action,
        subject_id=_optional_text(body, "subject_id"),
        agent_id=agent_id,
        reason=_optional_text(body, "reason"),
        details=details,
    )
    return AuditEvent(event_id, entry)
