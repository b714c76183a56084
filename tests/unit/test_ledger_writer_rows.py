"""The ledger writer's fast decoding path agrees with the reference decoder, field for field."""

from __future__ import annotations

import contextlib
import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caracald.consumers.ledger_writer import COLUMNS, _fast_row, _row_from_event, ledger_row
from caracald.core.events import (
    EventDecodeError,
    MeteringEvent,
    UnknownSchemaVersionError,
    decode,
    encode,
    event_id_for,
)
from caracald.core.ledger import LedgerEventType
from caracald.core.money import CURRENCY_MINOR_UNITS, Money

_UNESCAPE = {"\\\\": "\\", "\\t": "\t", "\\n": "\n", "\\r": "\r"}


def fields(line: bytes) -> dict[str, Any]:
    """A COPY text line back into column values (JSON parsed, so that formatting does not matter)."""
    text = line.decode()
    assert text.endswith("\n")
    out: dict[str, Any] = {}
    for name, raw in zip(COLUMNS, text[:-1].split("\t"), strict=True):
        if raw == "\\N":
            out[name] = None
            continue
        value = ""
        i = 0
        while i < len(raw):
            pair = raw[i : i + 2]
            if pair in _UNESCAPE:
                value += _UNESCAPE[pair]
                i += 2
            else:
                assert raw[i] != "\\", raw
                value += raw[i]
                i += 1
        out[name] = json.loads(value) if name == "metadata" else value
    return out


def reference(payload: bytes) -> dict[str, Any]:
    _, line = _row_from_event(decode(payload).to_ledger_event())
    return fields(line)


text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
json_scalars = st.none() | st.booleans() | st.integers(-(10**6), 10**6) | text
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)
currencies = st.sampled_from(sorted(CURRENCY_MINOR_UNITS))
offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
amounts = st.decimals(min_value=Decimal("-1000"), max_value=Decimal("100000"), places=12, allow_nan=False)


@st.composite
def metering_events(draw: st.DrawFn) -> MeteringEvent:
    currency = draw(currencies)
    has_hold = draw(st.booleans())
    return MeteringEvent(
        kind=draw(st.sampled_from(list(LedgerEventType))),
        request_id=draw(st.uuids()),
        agent_id=draw(st.uuids()),
        occurred_at=draw(
            st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=offsets)
        ),
        cost=Money(draw(amounts), currency),
        resource=draw(text | st.sampled_from(["https://api.openai.com/v1/chat\tcompletions", "a\\b\nc\r"])),
        model=draw(st.none() | text),
        hold=Money(draw(amounts), currency) if has_hold else None,
        input_tokens=draw(st.none() | st.integers(0, 10**9)),
        output_tokens=draw(st.none() | st.integers(-5, 10**9)),
        cached_input_tokens=draw(st.none() | st.integers(0, 10**9)),
        policy_ids=tuple(draw(st.lists(st.uuids(), max_size=3))),
        deny_reason=draw(st.none() | text),
        extra=draw(st.dictionaries(text, json_values, max_size=3)),
    )


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(metering_events())
def test_the_fast_path_takes_every_well_formed_event_and_agrees(event: MeteringEvent) -> None:
    payload = encode(event)
    fast = _fast_row(payload)
    assert fast is not None
    assert fast[0] == str(event.event_id)
    assert fields(fast[1]) == reference(payload)


MUTATIONS: list[tuple[str, Any]] = [
    ("schema_version", 2),
    ("schema_version", True),
    ("schema_version", "1"),
    ("event_id", str(uuid.uuid4())),
    ("request_id", 5),
    ("request_id", "not-a-uuid"),
    ("agent_id", "{12345678-1234-5678-1234-567812345678}"),
    ("agent_id", "12345678123456781234567812345678"),
    ("kind", "refund"),
    ("kind", None),
    ("occurred_at", "2025-01-01T00:00:00"),
    ("occurred_at", "2025-13-01T00:00:00+00:00"),
    ("occurred_at", "20250101T000000Z"),
    ("occurred_at", 1735689600),
    ("cost", "NaN"),
    ("cost", "Infinity"),
    ("cost", 1.5),
    ("cost", 2),
    ("cost", "1e400000"),
    ("cost", "abc"),
    ("currency", "XXX"),
    ("currency", "usd"),
    ("currency", " eur "),
    ("hold", "0.1"),
    ("hold", 3),
    ("resource", None),
    ("resource", 7),
    ("resource", ""),
    ("model", 4),
    ("input_tokens", "12"),
    ("input_tokens", True),
    ("input_tokens", 2**70),
    ("input_tokens", 1.0),
    ("policy_ids", ["x"]),
    ("policy_ids", [5]),
    ("policy_ids", "abc"),
    ("policy_ids", {}),
    ("policy_ids", [str(uuid.UUID(int=1)).upper()]),
    ("deny_reason", 5),
    ("deny_reason", ""),
    ("extra", [["k", 1]]),
    ("extra", "ab"),
    ("extra", 0),
    ("extra", {"hold": "x", "nested": {"a": [1, None]}}),
    ("extra", {"bad": float("nan")}),
    ("extra", {"nul": "\u0000"}),
    ("extra", {"surrogate": "\ud800"}),
    ("deny_reason", "\ud800"),
]


def _base_body() -> dict[str, Any]:
    event = MeteringEvent(
        kind=LedgerEventType.SETTLEMENT,
        request_id=uuid.uuid4(),
        agent_id=uuid.uuid4(),
        occurred_at=datetime(2025, 6, 1, 12, 30, tzinfo=UTC),
        cost=Money(Decimal("0.0123"), "USD"),
        resource="https://api.openai.com/v1/chat/completions",
        model="gpt-4o",
        input_tokens=10,
        output_tokens=20,
        policy_ids=(uuid.uuid4(),),
    )
    body: dict[str, Any] = json.loads(encode(event))
    return body


@pytest.mark.parametrize(("key", "value"), MUTATIONS, ids=[f"{k}={v!r}" for k, v in MUTATIONS])
def test_the_fast_path_never_accepts_what_the_reference_refuses(key: str, value: Any) -> None:
    body = _base_body()
    body[key] = value
    if key in ("request_id", "kind") and isinstance(value, str):
        # keep the event id consistent where the mutation would otherwise only break that check
        with contextlib.suppress(ValueError):
            body["event_id"] = str(event_id_for(uuid.UUID(body["request_id"]), LedgerEventType(body["kind"])))
    payload = json.dumps(body).encode("utf-8", "surrogatepass")
    fast = _fast_row(payload)
    try:
        expected = reference(payload)
    except (EventDecodeError, UnicodeEncodeError, ValueError, TypeError):
        assert fast is None
        with pytest.raises(EventDecodeError):
            ledger_row(payload)
        return
    if fast is not None:
        assert fields(fast[1]) == expected
    assert fields(ledger_row(payload)[1]) == expected


#: Times as datetime.fromisoformat reads them, in the form the gateway writes and in others: the fast path
#: passes the first through untouched and must record every one as the reference does.
TIME_FORMS = [
    "2025-06-01T12:30:00+00:00",
    "2025-06-01T12:30:00.250000+00:00",
    "2025-06-01T12:30:00.000000+00:00",
    "2025-06-01T12:30:00.25+00:00",
    "2025-06-01T12:30:00,250000+00:00",
    "2025-06-01 12:30:00+00:00",
    "2025-06-01T12:30:00-00:00",
    "2025-06-01T12:30:00Z",
    "2025-06-01T14:30:00+02:00",
    "2025-06-01T12:30:00+00:00:00",
    "2025-06-01T12:30:00.250000+0000",
    "20250601T123000+00:00",
    "20250601T123000.250000+00:00",
    "2025-06-01T12:30+00:00",
    "0001-01-01T00:00:00+00:00",
    "9999-12-31T23:59:59.999999+00:00",
]


@pytest.mark.parametrize("text", TIME_FORMS)
def test_a_time_in_any_iso_form_is_recorded_as_the_reference_records_it(text: str) -> None:
    body = _base_body()
    body["occurred_at"] = text
    payload = json.dumps(body).encode()
    fast = _fast_row(payload)
    assert fast is not None
    assert fields(fast[1]) == reference(payload)


def test_nan_in_extra_is_refused_before_the_database() -> None:
    body = _base_body()
    body["extra"] = {"ratio": float("nan")}
    payload = json.dumps(body).encode()
    assert _fast_row(payload) is None
    with pytest.raises(EventDecodeError, match="not JSON"):
        ledger_row(payload)


def test_a_missing_field_falls_back_to_the_reference_error() -> None:
    body = _base_body()
    del body["agent_id"]
    assert _fast_row(json.dumps(body).encode()) is None
    with pytest.raises(EventDecodeError, match="malformed"):
        ledger_row(json.dumps(body).encode())


@pytest.mark.parametrize("payload", [b"", b"not json", b"[1, 2]", b"\xff\xfe", b'{"schema_version": 1}'])
def test_garbage_is_an_event_decode_error(payload: bytes) -> None:
    with pytest.raises(EventDecodeError):
        ledger_row(payload)


def test_an_unknown_schema_version_keeps_its_own_error_type() -> None:
    body = _base_body()
    body["schema_version"] = 99
    with pytest.raises(UnknownSchemaVersionError):
        ledger_row(json.dumps(body).encode())
