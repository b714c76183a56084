"""Metering events on the bus: what the gateway emits and the ledger writer applies.

Every event has a deterministic id derived from the request id and its kind, so a retried emission, a
replayed topic or a redriven dead letter can never apply twice: the ledger's unique idempotency key
absorbs the duplicate. Amounts travel as decimal strings, never as JSON numbers.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

import msgspec

from caracald.core.errors import CaracalError
from caracald.core.ledger import LedgerEvent, LedgerEventType
from caracald.core.money import Money

SCHEMA_VERSION: Final = 1
METERING_TOPIC: Final = "caracal.metering.events"
AUDIT_TOPIC: Final = "caracal.audit.events"
DLQ_TOPIC: Final = "caracal.dlq"

#: Namespace of the deterministic event ids.
_EVENT_NAMESPACE: Final = uuid.UUID("6f1c7a52-8e0b-4a7e-9a43-2f3d3c1c0a11")


_json_encode: Final = msgspec.json.Encoder().encode


class EventDecodeError(CaracalError):
    """A message that is not a metering event Caracal understands."""

    reason = "undecodable"


class UnknownSchemaVersionError(EventDecodeError):
    reason = "unknown_schema_version"


_NAMESPACE_BYTES: Final = _EVENT_NAMESPACE.bytes
#: The RFC 4122 variant bits (10xx) set in a hex digit.
_VARIANT_DIGIT: Final = {digit: "89ab"[int(digit, 16) & 0x3] for digit in "0123456789abcdef"}


def event_id_text(request_id: str, kind: str) -> str:
    """``str(uuid5(namespace, f"{request_id}:{kind}"))`` for a canonical request id, without UUID objects (a
    third of the cost): the SHA-1 in hex, with the version digit (5) and the variant bits set in place."""
    h = hashlib.sha1(_NAMESPACE_BYTES + f"{request_id}:{kind}".encode(), usedforsecurity=False).hexdigest()
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT_DIGIT[h[16]]}{h[17:20]}-{h[20:32]}"


def event_id_for(request_id: uuid.UUID, kind: LedgerEventType) -> uuid.UUID:
    """The one id an effect of a request can have."""
    return uuid.UUID(event_id_text(str(request_id), kind.value))


@dataclass(frozen=True, slots=True)
class MeteringEvent:
    """One effect of one request. ``cost`` is the effect on spend (see ``LedgerEventType``)."""

    kind: LedgerEventType
    request_id: uuid.UUID
    agent_id: uuid.UUID
    occurred_at: datetime
    cost: Money
    resource: str = ""
    model: str | None = None
    hold: Money | None = None  # the reserved amount, on reservations and expiries
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int | None = None
    policy_ids: tuple[uuid.UUID, ...] = ()
    deny_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def event_id(self) -> uuid.UUID:
        return event_id_for(self.request_id, self.kind)

    @property
    def event_id_text(self) -> str:
        """``str(self.event_id)``, computed without a UUID object."""
        return event_id_text(str(self.request_id), self.kind.value)

    @property
    def key(self) -> bytes:
        """The partition key: one agent's events stay in order on one partition."""
        return str(self.agent_id).encode()

    def to_ledger_event(self) -> LedgerEvent:
        metadata: dict[str, Any] = dict(self.extra)
        if self.hold is not None:
            metadata["hold"] = str(self.hold.amount)
        if self.policy_ids:
            metadata["policy_ids"] = [str(p) for p in self.policy_ids]
        if self.deny_reason:
            metadata["deny_reason"] = self.deny_reason
        return LedgerEvent(
            idempotency_key=self.event_id,
            event_type=self.kind,
            agent_id=self.agent_id,
            occurred_at=self.occurred_at,
            cost=self.cost,
            resource=self.resource,
            request_id=self.request_id,
            model=self.model,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cached_input_tokens=self.cached_input_tokens,
            metadata=metadata,
        )


def encode(event: MeteringEvent, event_id: str | None = None) -> bytes:
    """The event's JSON; ``event_id`` is its ``event_id_text`` when the caller has it already."""
    body: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "event_id": event.event_id_text if event_id is None else event_id,
        "kind": event.kind.value,
        # msgspec writes a UUID as str() does, without the Python call
        "request_id": event.request_id,
        "agent_id": event.agent_id,
        "occurred_at": event.occurred_at.isoformat(),
        "cost": str(event.cost.amount),
        "currency": event.cost.currency,
        "resource": event.resource,
        "model": event.model,
        "hold": None if event.hold is None else str(event.hold.amount),
        "input_tokens": event.input_tokens,
        "output_tokens": event.output_tokens,
        "cached_input_tokens": event.cached_input_tokens,
        "policy_ids": event.policy_ids,
        "deny_reason": event.deny_reason,
        "extra": event.extra,
    }
    # msgspec writes what json.dumps(body, separators=(",", ":"), ensure_ascii=False) does, five times faster.
    return _json_encode(body)


def decode(payload: bytes) -> MeteringEvent:
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # also integers of too many digits, nesting too deep
        raise EventDecodeError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise EventDecodeError("not a JSON object")
    version = body.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UnknownSchemaVersionError(f"schema version {version!r} is not {SCHEMA_VERSION}")
    try:
        currency = str(body["currency"])
        hold = body.get("hold")
        event = MeteringEvent(
            kind=LedgerEventType(body["kind"]),
            request_id=uuid.UUID(body["request_id"]),
            agent_id=uuid.UUID(body["agent_id"]),
            occurred_at=datetime.fromisoformat(body["occurred_at"]),
            cost=Money(Decimal(str(body["cost"])), currency),
            resource=str(body.get("resource") or ""),
            model=body.get("model"),
            hold=None if hold is None else Money(Decimal(str(hold)), currency),
            input_tokens=body.get("input_tokens"),
            output_tokens=body.get("output_tokens"),
            cached_input_tokens=body.get("cached_input_tokens"),
            policy_ids=tuple(uuid.UUID(p) for p in body.get("policy_ids") or ()),
            deny_reason=body.get("deny_reason"),
            extra=dict(body.get("extra") or {}),
        )
    except (KeyError, ValueError, TypeError, AttributeError, ArithmeticError, CaracalError) as exc:
        raise EventDecodeError(f"malformed metering event: {exc!r}") from None
    if event.occurred_at.tzinfo is None:
        raise EventDecodeError("occurred_at has no time zone")
    try:  # consumers bucket events by UTC hour: an instant before year 1 or after 9999 in UTC is none
        event.occurred_at.astimezone(UTC)
    except OverflowError:
        raise EventDecodeError("occurred_at is out of range in UTC") from None
    if str(event.event_id) != body.get("event_id"):
        raise EventDecodeError("event_id does not match the request id and kind")
    return event
