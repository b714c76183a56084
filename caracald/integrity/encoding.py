"""The canonical bytes of a ledger event: what its Merkle leaf hashes (docs/ledger-encoding.md).

Version 1 is one version byte (``0x01``) followed by PostgreSQL's binary form of the row of the 15 fields
below (``record_send``): a 32-bit big-endian field count (15), then per field its 32-bit type OID, a 32-bit
length and that many bytes, or the length -1 (``ff ff ff ff``) and nothing for NULL::

    seq                  int8 (20)        int64 BE: position in the tree (leaf index + 1)
    event_id             int8 (20)        int64 BE
    idempotency_key      uuid (2950)      16 bytes, RFC 4122 order
    event_type           text (25)        UTF-8
    agent_id             uuid (2950)
    request_id           uuid (2950)      or NULL
    occurred_at          timestamptz (1184)  int64 BE microseconds since 2000-01-01T00:00:00Z (UTC)
    resource             text (25)
    model                text (25)        or NULL
    input_tokens         int8 (20)        or NULL
    output_tokens        int8 (20)        or NULL
    cached_input_tokens  int8 (20)        or NULL
    cost                 text (25)        decimal string at ledger scale (more digits only if it has them)
    currency             bpchar (1042)    3 ASCII bytes
    metadata             text (25)        JSON in jsonb normal form

Because the encoding is exactly what ``'\x01' || record_send(ROW(...))`` returns (:func:`canonical_sql`),
PostgreSQL computes it from the columns itself: the sealer stores it with one ``UPDATE``, and the verifier
has the server compare it with the stored bytes while streaming them, so only the stored bytes and a flag
travel. :func:`encode` and :func:`decode` are the same encoding in Python, for proofs checked offline (no
database at all) and for saying which field of a tampered row differs.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal, InvalidOperation
from typing import Any, Final
from uuid import UUID

from caracald.core.errors import ValidationError
from caracald.core.money import CURRENCY_MINOR_UNITS, LEDGER_EXTRA_DIGITS

VERSION: Final = 1
VERSION_BYTE: Final = bytes([VERSION])

#: The encoded fields, in order.
FIELDS: Final = (
    "seq",
    "event_id",
    "idempotency_key",
    "event_type",
    "agent_id",
    "request_id",
    "occurred_at",
    "resource",
    "model",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cost",
    "currency",
    "metadata",
)
#: PostgreSQL type OIDs of the fields, as record_send writes them.
INT8_OID: Final = 20
TEXT_OID: Final = 25
UUID_OID: Final = 2950
TIMESTAMPTZ_OID: Final = 1184
BPCHAR_OID: Final = 1042
FIELD_OIDS: Final = (
    INT8_OID,
    INT8_OID,
    UUID_OID,
    TEXT_OID,
    UUID_OID,
    UUID_OID,
    TIMESTAMPTZ_OID,
    TEXT_OID,
    TEXT_OID,
    INT8_OID,
    INT8_OID,
    INT8_OID,
    TEXT_OID,
    BPCHAR_OID,
    TEXT_OID,
)
_NULLABLE: Final = frozenset({"request_id", "model", "input_tokens", "output_tokens", "cached_input_tokens"})
_INT_FIELDS: Final = frozenset(
    {"seq", "event_id", "occurred_at", "input_tokens", "output_tokens", "cached_input_tokens"}
)
_UUID_FIELDS: Final = frozenset({"idempotency_key", "agent_id", "request_id"})

#: PostgreSQL's epoch: its binary timestamps count microseconds from here.
PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)

#: Where seq and event_id sit in any version 1 encoding (each after its type OID and length).
SEQ_SLICE: Final = slice(13, 21)
EVENT_ID_SLICE: Final = slice(29, 37)

_NULL: Final = b"\xff\xff\xff\xff"
_LEN = struct.Struct(">i")
_I64 = struct.Struct(">q")
_COST = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?")
_WIDE = Context(prec=200)
_DEFAULT_MINOR_UNITS: Final = 2


class EncodingError(ValidationError):
    """Bytes that are not a canonical version 1 ledger event encoding."""

    reason = "bad_encoding"


def ledger_scale(currency: str) -> int:
    """Digits after the point of a cost in ``currency``: its minor unit plus the ledger's extra digits.

    Unlike :func:`caracald.core.money.ledger_scale`, an unknown code does not raise: the encoding must
    be able to encode whatever the column holds (it counts as two minor digits).
    """
    return CURRENCY_MINOR_UNITS.get(currency.strip(), _DEFAULT_MINOR_UNITS) + LEDGER_EXTRA_DIGITS


def _scale_sql(column: str) -> str:
    groups: dict[int, list[str]] = {}
    for code, units in sorted(CURRENCY_MINOR_UNITS.items()):
        if units != _DEFAULT_MINOR_UNITS:
            groups.setdefault(units, []).append(code)
    cases = " ".join(
        f"WHEN {column} IN ({', '.join(repr(c) for c in codes)}) THEN {units + LEDGER_EXTRA_DIGITS}"
        for units, codes in sorted(groups.items())
    )
    return f"CASE {cases} ELSE {_DEFAULT_MINOR_UNITS + LEDGER_EXTRA_DIGITS} END"


def fields_sql(alias: str = "e", *, seq: str | None = None) -> str:
    """The 15 encoded fields as SQL expressions over ``ledger_events <alias>``, in order.

    ``seq`` replaces ``<alias>.seq`` (the sealer passes the seq it is about to assign).
    """
    a = alias
    cost = f"round({a}.cost, greatest({_scale_sql(f'{a}.currency')}, min_scale({a}.cost)))::text"
    return ", ".join(
        (
            seq or f"{a}.seq",
            f"{a}.event_id",
            f"{a}.idempotency_key",
            f"{a}.event_type",
            f"{a}.agent_id",
            f"{a}.request_id",
            f"{a}.occurred_at",
            f"{a}.resource",
            f"{a}.model",
            f"{a}.input_tokens",
            f"{a}.output_tokens",
            f"{a}.cached_input_tokens",
            cost,
            f"{a}.currency",
            f"{a}.metadata::text",
        )
    )


def canonical_sql(alias: str = "e", *, seq: str | None = None) -> str:
    """The SQL expression computing the canonical encoding of a ``ledger_events`` row."""
    return f"'\\x01'::bytea || pg_catalog.record_send(ROW({fields_sql(alias, seq=seq)}))"


#: The 15 fields over ``ledger_events e``.
FIELDS_SQL: Final = fields_sql()
#: Their encoding, computed by PostgreSQL.
CANONICAL_SQL: Final = canonical_sql()


# --------------------------------------------------------------------------- JSON in jsonb normal form


def _json_number(value: Decimal) -> str:
    if not value.is_finite():
        raise EncodingError(f"JSON numbers must be finite, not {value}")
    if value == 0:
        value = abs(value)  # numeric has no negative zero; keeps the scale
    return format(value, "f")


def _json_string(text: str) -> str:
    # PostgreSQL's escape_json and Python's encoder escape exactly the same characters, the same way.
    return json.dumps(text, ensure_ascii=False)


def _key_order(key: str) -> tuple[int, bytes]:
    raw = key.encode()
    return len(raw), raw


def _json_text(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _json_number(Decimal(repr(value)))  # what json.dumps sends PostgreSQL
    if isinstance(value, Decimal):
        return _json_number(value)
    if isinstance(value, str):
        return _json_string(value)
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise EncodingError("JSON object keys must be strings")
        items = sorted(value.items(), key=lambda kv: _key_order(kv[0]))
        return "{" + ", ".join(f"{_json_string(k)}: {_json_text(v)}" for k, v in items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_json_text(v) for v in value) + "]"
    raise EncodingError(f"cannot encode {type(value).__name__} as JSON")


def metadata_text(value: Any) -> str:
    """``value`` as PostgreSQL prints the jsonb made from it: its one canonical spelling.

    Object keys sorted by UTF-8 length, then bytes; ``", "`` and ``": "`` separators; numbers in plain
    decimal notation keeping their scale (``1.50`` stays ``1.50``, ``1e2`` is ``100``).
    """
    return _json_text(value)


def parse_metadata(text: str) -> Any:
    """Parse JSON keeping every number exact (decimals as Decimal)."""
    try:
        return json.loads(text, parse_float=Decimal, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise EncodingError(f"metadata is not valid JSON: {exc}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# --------------------------------------------------------------------------- costs


def cost_text(amount: Decimal, currency: str) -> str:
    """``amount`` with exactly ``max(ledger scale, digits it has)`` digits after the point."""
    if not isinstance(amount, Decimal) or not amount.is_finite():
        raise EncodingError(f"a cost must be a finite Decimal, not {amount!r}")
    exponent = amount.normalize(_WIDE).as_tuple().exponent
    own_scale = max(0, -exponent) if isinstance(exponent, int) and amount != 0 else 0
    scale = max(ledger_scale(currency), own_scale)
    quantized = amount.quantize(Decimal(1).scaleb(-scale), context=_WIDE)
    if quantized == 0:
        quantized = abs(quantized)
    return format(quantized, "f")


# --------------------------------------------------------------------------- the record


@dataclass(frozen=True, slots=True)
class LedgerRecord:
    """Every encoded column of one sealed ledger event."""

    seq: int
    event_id: int
    idempotency_key: UUID
    event_type: str
    agent_id: UUID
    request_id: UUID | None
    occurred_at: datetime
    resource: str
    model: str | None
    input_tokens: int | None
    output_tokens: int | None
    cached_input_tokens: int | None
    cost: Decimal
    currency: str
    metadata: Any

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (the cost and metadata in their canonical text)."""
        return {
            "seq": self.seq,
            "event_id": self.event_id,
            "idempotency_key": str(self.idempotency_key),
            "event_type": self.event_type,
            "agent_id": str(self.agent_id),
            "request_id": str(self.request_id) if self.request_id else None,
            "occurred_at": _format_time(self.occurred_at),
            "resource": self.resource,
            "model": self.model,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "cost": cost_text(self.cost, self.currency),
            "currency": self.currency.strip(),
            "metadata": metadata_text(self.metadata),
        }


def _format_time(ts: datetime) -> str:
    text = ts.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds")
    return text + "Z"


def _int8(value: int, name: str) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EncodingError(f"{name} must be an integer")
    try:
        return _I64.pack(value)
    except struct.error:
        raise EncodingError(f"{name} does not fit in 64 bits") from None


def _field(oid: int, data: bytes | None) -> bytes:
    if data is None:
        return _LEN.pack(oid) + _NULL
    return _LEN.pack(oid) + _LEN.pack(len(data)) + data


def _micros(ts: datetime) -> int:
    if not isinstance(ts, datetime) or ts.utcoffset() is None:
        raise EncodingError("occurred_at must be a timezone-aware datetime")
    return (ts - PG_EPOCH) // _MICROSECOND


def encode(record: LedgerRecord) -> bytes:
    """The canonical bytes of ``record`` (what the sealer stores, computed from the columns)."""
    r = record
    values = (
        _int8(r.seq, "seq"),
        _int8(r.event_id, "event_id"),
        r.idempotency_key.bytes,
        r.event_type.encode(),
        r.agent_id.bytes,
        r.request_id.bytes if r.request_id is not None else None,
        _int8(_micros(r.occurred_at), "occurred_at"),
        r.resource.encode(),
        r.model.encode() if r.model is not None else None,
        _int8(r.input_tokens, "input_tokens") if r.input_tokens is not None else None,
        _int8(r.output_tokens, "output_tokens") if r.output_tokens is not None else None,
        _int8(r.cached_input_tokens, "cached_input_tokens") if r.cached_input_tokens is not None else None,
        cost_text(r.cost, r.currency).encode(),
        r.currency.encode(),
        metadata_text(r.metadata).encode(),
    )
    return (
        VERSION_BYTE
        + _LEN.pack(len(FIELDS))
        + b"".join(_field(oid, v) for oid, v in zip(FIELD_OIDS, values, strict=True))
    )


def raw_fields(data: bytes | memoryview) -> list[bytes | None]:
    """The 15 raw field values of a version 1 encoding (checking the layout and type OIDs only)."""
    view = bytes(data)
    if not view or view[0] != VERSION:
        found = view[0] if view else "none"
        raise EncodingError(f"unknown encoding version {found} (expected {VERSION})")
    if len(view) < 5 or _LEN.unpack_from(view, 1)[0] != len(FIELDS):
        raise EncodingError(f"an encoding holds {len(FIELDS)} fields")
    fields: list[bytes | None] = []
    p = 5
    for name, oid in zip(FIELDS, FIELD_OIDS, strict=True):
        if p + 8 > len(view):
            raise EncodingError("truncated: a field header is cut off")
        found_oid, length = _LEN.unpack_from(view, p)[0], _LEN.unpack_from(view, p + 4)[0]
        p += 8
        if found_oid != oid:
            raise EncodingError(f"{name} has type {found_oid}, not {oid}")
        if length == -1:
            fields.append(None)
            continue
        if length < 0 or p + length > len(view):
            raise EncodingError("truncated: a field is longer than the data")
        fields.append(view[p : p + length])
        p += length
    if p != len(view):
        raise EncodingError(f"{len(view) - p} bytes after the last field")
    return fields


def _text(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise EncodingError(f"{name} is not UTF-8") from None


def decode(data: bytes) -> LedgerRecord:
    """The record encoded by ``data``; refuses anything that is not the one canonical spelling."""
    raw = raw_fields(bytes(data))
    values: dict[str, Any] = {}
    for name, field in zip(FIELDS, raw, strict=True):
        if field is None:
            if name not in _NULLABLE:
                raise EncodingError(f"{name} is NULL")
            values[name] = None
        elif name in _INT_FIELDS:
            if len(field) != 8:
                raise EncodingError(f"{name} is {len(field)} bytes, not 8")
            values[name] = _I64.unpack(field)[0]
        elif name in _UUID_FIELDS:
            if len(field) != 16:
                raise EncodingError(f"{name} is {len(field)} bytes, not 16")
            values[name] = UUID(bytes=field)
        else:
            values[name] = _text(field, name)
    try:
        values["occurred_at"] = PG_EPOCH + values["occurred_at"] * _MICROSECOND
    except OverflowError:
        raise EncodingError("occurred_at is out of range") from None
    if _COST.fullmatch(values["cost"]) is None:
        raise EncodingError(f"cost {values['cost']!r} is not a decimal string")
    try:
        values["cost"] = Decimal(values["cost"])
    except InvalidOperation:
        raise EncodingError("cost is not a decimal") from None
    values["metadata"] = parse_metadata(values["metadata"])
    record = LedgerRecord(**values)
    if encode(record) != bytes(data):
        raise EncodingError("the encoding is not canonical (a field is spelled differently than it must be)")
    return record


def differing_fields(stored: bytes, expected: bytes) -> list[str]:
    """Names of the fields that differ between two encodings (all of them if one cannot be split)."""
    try:
        a = raw_fields(stored)
        b = raw_fields(expected)
    except EncodingError:
        return list(FIELDS)
    return [name for name, x, y in zip(FIELDS, a, b, strict=True) if x != y]


def from_columns(row: Mapping[str, Any] | Sequence[Any]) -> LedgerRecord:
    """A record from a ``ledger_events`` row read with psycopg (metadata as parsed JSON)."""
    if not isinstance(row, Mapping):
        row = dict(zip(FIELDS, row, strict=True))
    return LedgerRecord(**{name: row[name] for name in FIELDS})
