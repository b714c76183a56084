"""The metering event's wire form: its id and its JSON, as every consumer and older writer reads them."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from caracald.core.events import MeteringEvent, decode, encode, event_id_for, event_id_text
from caracald.core.ledger import LedgerEventType
from caracald.core.money import Money

NAMESPACE = uuid.UUID("6f1c7a52-8e0b-4a7e-9a43-2f3d3c1c0a11")


@pytest.mark.parametrize("kind", list(LedgerEventType))
def test_event_ids_are_the_uuid5_of_request_and_kind(kind: LedgerEventType) -> None:
    for _ in range(200):
        request_id = uuid.uuid4()
        expected = uuid.uuid5(NAMESPACE, f"{request_id}:{kind.value}")
        assert event_id_text(str(request_id), kind.value) == str(expected)
        assert event_id_for(request_id, kind) == expected
        event = MeteringEvent(kind, request_id, uuid.uuid4(), datetime.now(UTC), Money.zero("USD"))
        assert event.event_id == expected
        assert event.event_id_text == str(expected)


def test_encoding_is_compact_utf8_json_and_reads_back() -> None:
    event = MeteringEvent(
        kind=LedgerEventType.SETTLEMENT,
        request_id=uuid.uuid4(),
        agent_id=uuid.uuid4(),
        occurred_at=datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC),
        cost=Money(Decimal("0.000123450000"), "EUR"),
        resource="https://api.example.com/v1/x?q=é\u2028\x01",
        model="gpt-4o-mini",
        hold=Money(Decimal("0.0005"), "EUR"),
        input_tokens=12,
        output_tokens=5,
        policy_ids=(uuid.uuid4(), uuid.uuid4()),
        extra={"n": [1, 2.5, None, True], "s": 'ü"\\\n\t\u2028', "nested": {"a": {}}, "status": 200},
    )
    payload = encode(event)
    body = json.loads(payload)
    # what the standard library writes with the same settings, byte for byte
    assert payload == json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    assert body["event_id"] == str(event.event_id)
    assert body["cost"] == str(event.cost.amount)  # amounts as decimal strings, never JSON numbers
    assert decode(payload) == event
