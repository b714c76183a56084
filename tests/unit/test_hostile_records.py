"""Records the hostile-input drill (bench/drills/hostile.py) found escaping the decoders as exceptions other
than ``EventDecodeError``, crashing the ledger writer, or stalling the metrics aggregator and the audit logger
(an exception classified as an outage is retried forever): each is now refused by the decoders, and what a
consumer raises before reaching its store is a permanent failure (the record is dead-lettered)."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from redis import exceptions as redis_errors

from caracald.bus.base import Record
from caracald.consumers.audit_logger import AuditLogProcessor
from caracald.consumers.ledger_writer import Failure, _fast_row, ledger_row
from caracald.consumers.metrics_aggregator import RedisAggregates
from caracald.core.audit import AuditEntry, AuditEvent, AuditEventType, decode_event, encode_event
from caracald.core.events import EventDecodeError, MeteringEvent, decode, encode
from caracald.core.ledger import LedgerEventType
from caracald.core.money import Money

AGGREGATES = RedisAggregates(None)
OUT_OF_RANGE = ["0001-01-01T00:00:00+01:00", "0001-01-01T00:30:00+23:59", "9999-12-31T23:59:59-01:00"]


def metering(**changes: Any) -> bytes:
    event = MeteringEvent(
        LedgerEventType.SETTLEMENT,
        uuid.uuid4(),
        uuid.uuid4(),
        datetime(2025, 1, 1, tzinfo=UTC),
        Money(Decimal("0.5"), "USD"),
        model="m",
    )
    return json.dumps({**json.loads(encode(event)), **changes}).encode()


def audit(**changes: Any) -> bytes:
    entry = AuditEntry(datetime(2025, 1, 1, tzinfo=UTC), "alice", AuditEventType.OPS_PROCEDURE, "test")
    return json.dumps({**json.loads(encode_event(AuditEvent.new(entry))), **changes}).encode()


def splice(payload: bytes, name: str, raw: bytes) -> bytes:
    """``payload`` with the JSON value of ``name`` replaced by ``raw`` (text no JSON encoder writes)."""
    body = json.loads(payload)
    body[name] = "\u2603"
    return json.dumps(body).encode().replace(b'"\\u2603"', raw)


def aggregator_decode(payload: bytes) -> Any:
    return AGGREGATES.decode(Record("caracal.metering.events", 0, 0, None, payload))


DECODERS: list[Callable[[bytes], Any]] = [decode, ledger_row, aggregator_decode, decode_event]


@pytest.mark.parametrize(
    "payload",
    [
        b"1" * 5000,  # more digits than Python converts
        splice(metering(), "cost", b"1" * 5000),
        splice(audit(), "details", b'{"n":' + b"9" * 5000 + b"}"),
        b"[" * 100_000,
        b"[" * 5000 + b"]" * 5000,
        splice(metering(), "extra", b'{"a":' * 5000 + b"1" + b"}" * 5000),
        splice(audit(), "details", b'{"a":' * 5000 + b"1" + b"}" * 5000),
    ],
)
def test_every_decoder_raises_only_event_decode_error(payload: bytes) -> None:
    for decoder in DECODERS:
        with pytest.raises(EventDecodeError):
            decoder(payload)


def test_extra_nested_too_deep_to_serialise_is_a_decode_error_not_a_crash() -> None:
    # the fast path's parser reads deeper nesting than json.dumps writes: it used to raise RecursionError
    for depth in range(990, 1023):
        payload = splice(metering(), "extra", b'{"a":' * depth + b"1" + b"}" * depth)
        with contextlib.suppress(EventDecodeError):  # anything else fails the test
            ledger_row(payload)


@pytest.mark.parametrize("when", OUT_OF_RANGE)
def test_an_instant_out_of_range_in_utc_is_refused_by_every_decoder(when: str) -> None:
    # the aggregator buckets events by UTC hour and the audit chain hashes the UTC instant: both overflowed
    for decoder in (decode, ledger_row, aggregator_decode):
        with pytest.raises(EventDecodeError):
            decoder(metering(occurred_at=when))
    assert _fast_row(metering(occurred_at=when)) is None  # the fast path agrees with the reference
    with pytest.raises(EventDecodeError):
        decode_event(audit(occurred_at=when))
    for edge in ("0001-01-01T00:00:00+00:00", "9999-12-31T23:59:59.999999+00:00"):
        assert decode(metering(occurred_at=edge)).occurred_at.year in (1, 9999)


@pytest.mark.parametrize("model", ["\ud800", "a\udfffb", {"a": 1}, ["m"], 7])
def test_the_aggregator_refuses_a_model_that_cannot_name_a_redis_key(model: Any) -> None:
    with pytest.raises(EventDecodeError):
        aggregator_decode(metering(model=model))
    with pytest.raises(EventDecodeError):
        ledger_row(metering(model=model))  # the ledger writer refuses it too


@pytest.mark.parametrize(
    "error",
    [
        OverflowError("date value out of range"),
        "a\ud800".encode,  # UnicodeEncodeError when called
        RecursionError("maximum recursion depth exceeded"),
        TypeError("unhashable"),
    ],
)
def test_what_fails_before_the_store_is_permanent(error: Any) -> None:
    if callable(error):
        try:
            error()
        except UnicodeEncodeError as exc:
            error = exc
    assert AGGREGATES.classify(error) is Failure.PERMANENT
    assert AuditLogProcessor("postgresql://unused").classify(error) is Failure.PERMANENT


def test_an_unreachable_store_is_still_an_outage() -> None:
    assert AGGREGATES.classify(redis_errors.ConnectionError("refused")) is Failure.OUTAGE
    assert AGGREGATES.classify(redis_errors.TimeoutError("timed out")) is Failure.OUTAGE
    assert AuditLogProcessor("postgresql://unused").classify(OSError("refused")) is Failure.OUTAGE
