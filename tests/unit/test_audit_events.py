"""The audit event envelope on ``caracal.audit.events``: round trips, and what it refuses."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from caracald.core.audit import (
    AUDIT_SCHEMA_VERSION,
    AuditEntry,
    AuditEvent,
    AuditEventType,
    chain_hash,
    decode_event,
    encode_event,
)
from caracald.core.events import EventDecodeError, UnknownSchemaVersionError

text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=40)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)


@given(
    actor=text.filter(bool),
    action=text.filter(bool),
    kind=st.sampled_from(list(AuditEventType)),
    subject=st.none() | text,
    agent=st.none() | st.uuids(),
    reason=st.none() | text,
    details=st.dictionaries(text, json_value, max_size=5),
    offset_minutes=st.integers(min_value=-720, max_value=840),
)
def test_round_trip_keeps_the_entry_and_its_hash(
    actor: str,
    action: str,
    kind: AuditEventType,
    subject: str | None,
    agent: uuid.UUID | None,
    reason: str | None,
    details: dict[str, object],
    offset_minutes: int,
) -> None:
    at = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=timezone(timedelta(minutes=offset_minutes)))
    entry = AuditEntry(at, actor, kind, action, subject, str(agent) if agent else None, reason, details)
    event = AuditEvent.new(entry)
    back = decode_event(encode_event(event))
    assert back.event_id == event.event_id
    assert back.entry.canonical() == entry.canonical()
    assert chain_hash(bytes(32), back.entry) == chain_hash(bytes(32), entry)


def _body(**changes: object) -> bytes:
    body = {
        "schema_version": AUDIT_SCHEMA_VERSION,
        "event_id": str(uuid.uuid4()),
        "occurred_at": datetime(2024, 1, 1, tzinfo=UTC).isoformat(),
        "actor": "alice",
        "event_type": "ops_procedure",
        "action": "backup.create.started",
        "subject_id": None,
        "agent_id": None,
        "reason": None,
        "details": {},
    }
    body.update(changes)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[]",
        _body(event_id="nope"),
        _body(occurred_at="2024-01-01T00:00:00"),  # no time zone
        _body(event_type="unknown_type"),
        _body(actor=""),
        _body(actor=5),
        _body(action=None),
        _body(details=[1, 2]),
        _body(agent_id="not-a-uuid"),
        _body(reason=7),
        _body(actor="nul\x00here"),
        _body(details={"k": "nul\x00here"}),
        _body(subject_id="\ud800"),  # a lone surrogate cannot be stored
    ],
)
def test_malformed_events_are_refused(payload: bytes) -> None:
    with pytest.raises(EventDecodeError):
        decode_event(payload)


def test_an_unknown_schema_version_is_its_own_error() -> None:
    with pytest.raises(UnknownSchemaVersionError):
        decode_event(_body(schema_version=2))
