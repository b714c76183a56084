"""Tamper drill: random corruption of the stored ledger, and whether verification finds every one.

    python -m bench.drills.tamper                  # 1,000 trials on a PostgreSQL of its own
    python bench/drills/tamper.py --trials 200 --seed 7 --postgres-uri postgresql://...

The ledger: 5,000 events of eight agents (reservations, settlements, expiries, adjustments, denials; costs
in USD, EUR, JPY and BHD; metadata with nested and non-ASCII JSON), written with the ledger writer's insert
(``caracald.store.ledger.insert_events``; a few inserts rolled back on the way leave gaps in the event ids,
as in production) and sealed by the production sealer into signed Merkle batches of 100 to 900 events,
under a key made by ``keys.generate``.

Each trial (1,000; 100 with ``env.quick``) is one corruption drawn with ``random.Random(seed)``, of one of
five kinds, each with its variants:

* bit flip, event row: one bit of one stored field (any of the 15 encoded ones, the canonical bytes, the
  batch it names) of one sealed row;
* bit flip, Merkle data: one bit of a batch's id, seq range, event count, root, signed checkpoint (body or
  signature), start frontier, consistency proof, leaf or block hashes, or of the tree state;
* deletion: an event, the first or last of a batch, the ledger's last one, a run, a batch's events, a batch
  row, a batch with its events, the tree state, or the ledger's tail rolled back (events, batch and state);
* insertion: a forged row at a sealed seq (its own canonical bytes consistent), one slipped in with every
  later row renumbered and re-encoded, one past the last batch, an unsealed one backdated, or a forged batch
  appended by the production sealer under an intruder's key (same name, not trusted);
* swap: two rows' seqs, positions (seq and canonical bytes), whole slots (with the batch they name),
  contents, one column, event ids or canonical bytes; or two batches' checkpoints, roots, frontiers, ids or
  hash lists.

Every corruption is one the database holds: a flip the column cannot take (invalid UTF-8, a time past year
9999) is drawn again, and a flip or swap that would change nothing is never made.

A trial runs in one transaction, as a superuser with the guard triggers off (``session_replication_role =
replica``) who drops whatever constraint is in the way (inside the transaction), is verified in it, and is
rolled back: the next trial starts from the clean ledger (checked at the end: tables and constraints are
byte for byte what they were). Verification is ``caracal merkle verify-range``'s own code
(``caracald.integrity.verifier.verify_range``), run in the trial's transaction: over the tampered period (the
time span of the batches touched: what an operator checking that period runs) on every trial, and over the
whole ledger on every fourth and on each one the period check passed (it takes three times as long). A tail
rolled back is only detectable against a checkpoint remembered from before (by design): those trials pass
the newest checkpoint, as ``--trusted-checkpoint`` does.

False alarms: the clean ledger is verified (whole, a random period, and against the trusted checkpoint)
before the first trial, after every 5% of them, and after the last one.

The command itself: the first trial of each kind is applied again, committed, to a copy of the ledger
(``CREATE DATABASE ... TEMPLATE``), and the real ``caracal merkle verify-range`` runs on it in a subprocess
(``CARACAL_DATABASE_URL``, ``CARACAL__INTEGRITY__KEY_DIR``); so it does on an untouched copy. It must exit 1
with ``FAILED`` on each tampered copy, and 0 with ``PASSED`` on the clean one.

Not tampered with, because no signature covers them by design: ``recorded_at`` (when the row was written;
only its age decides whether an unsealed row is late), the batch columns describing the checkpoint
(``key_name``, ``key_id``, ``created_at``), the batches' time spans (verify-range also finds batches by their
events' own times), the recorded verification outcome, and ``merkle_keys`` (a verifier trusts key files,
never that table).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402
from psycopg.conninfo import conninfo_to_dict  # noqa: E402
from psycopg.rows import dict_row  # noqa: E402

from bench.drills import report  # noqa: E402
from bench.drills.report import Row, info, invariant  # noqa: E402
from caracald.core.ledger import LedgerEvent, LedgerEventType  # noqa: E402
from caracald.core.money import Money  # noqa: E402
from caracald.core.signing import SigningKey, VerifyingKey, generate_key  # noqa: E402
from caracald.integrity import keys, sealer, verifier  # noqa: E402
from caracald.integrity.encoding import CANONICAL_SQL, PG_EPOCH  # noqa: E402
from caracald.store import ledger as ledger_store  # noqa: E402
from caracald.store.database import Database  # noqa: E402
from caracald.store.migrate import migrate  # noqa: E402
from tests.harness.postgres import PostgresService  # noqa: E402

DRILL = "tamper"
TRIALS = 1000
QUICK_TRIALS = 100
EVENTS = 5000
AGENTS = 8
#: Events per batch, drawn per batch (the production default is 1,000, fewer when sealed by age).
BATCH_SIZES = (100, 900)
#: Events per writer transaction while the ledger is built.
CHUNK = 250
START = datetime(2025, 3, 1, tzinfo=UTC)
#: The clean ledger is verified again after every this share of the trials.
CLEAN_EVERY = 0.05
#: The whole ledger is verified on every this many trials (and on each one the period check passed).
WHOLE_EVERY = 4
#: Draws a variant gets before a trial is given up (never reached: each variant has plenty that fit).
ATTEMPTS = 200
ALL_TIME = (datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, tzinfo=UTC))

Conn = psycopg.Connection[dict[str, Any]]
Period = tuple[datetime, datetime]


class TamperEnv(Protocol):
    """What the drill uses of :class:`bench.drills.env.DrillEnv` (which has it all)."""

    postgres: PostgresService
    quick: bool
    seed: int

    def database(self, purpose: str) -> str: ...

    def folder(self, name: str) -> Path: ...


# --------------------------------------------------------------------------- the ledger under test

_KINDS = (
    (LedgerEventType.RESERVATION, 34),
    (LedgerEventType.SETTLEMENT, 34),
    (LedgerEventType.EXPIRY, 8),
    (LedgerEventType.ADJUSTMENT, 8),
    (LedgerEventType.DENIAL, 16),
)
#: Currency, its rate to USD, and its share of the events.
_CURRENCIES = (("USD", Decimal(1), 70), ("EUR", Decimal("0.92"), 15), ("JPY", Decimal(150), 10))
_CURRENCIES += (("BHD", Decimal("0.376"), 5),)
_MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4", "claude-3-5-haiku", None)
_RESOURCES = (
    "https://api.openai.com/v1/chat/completions",
    "https://api.anthropic.com/v1/messages",
    "https://api.example.com/v1/søk?q=ü&lang=fr-CA",
    "https://search.example.org/v2/query",
)


def _uuid(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


def _event(rng: random.Random, agent: uuid.UUID, at: datetime) -> LedgerEvent:
    kind = rng.choices([k for k, _ in _KINDS], weights=[w for _, w in _KINDS])[0]
    code, rate, _ = rng.choices(_CURRENCIES, weights=[c[2] for c in _CURRENCIES])[0]
    settled = kind is LedgerEventType.SETTLEMENT
    tokens_in, tokens_out = rng.randint(10, 8000), rng.randint(1, 4000)
    hold = Decimal(rng.randint(1, 500)) / 1000
    usd = {
        LedgerEventType.SETTLEMENT: (tokens_in * Decimal("2.5") + tokens_out * Decimal(10)) / 1_000_000,
        LedgerEventType.EXPIRY: hold,
        LedgerEventType.ADJUSTMENT: Decimal(rng.randint(-5000, 5000)) / 1_000_000,
    }.get(kind, Decimal(0))  # a reservation or a denial spends nothing
    metadata: dict[str, Any] = {"policy_ids": [str(_uuid(rng))], "hold": str(hold)}
    if settled:
        region = rng.choice(["eu-west-1", "us-east-2"])
        metadata.update(latency_ms=rng.randint(80, 9000), ratio=1.5, route={"region": region, "retries": 0})
    if kind is LedgerEventType.DENIAL:
        metadata["reason"] = rng.choice(["budget exceeded", "hors liste blanche : accès refusé ☂"])
    return LedgerEvent(
        idempotency_key=_uuid(rng),
        event_type=kind,
        agent_id=agent,
        occurred_at=at,
        cost=Money(usd * rate, code),
        resource=rng.choice(_RESOURCES),
        request_id=_uuid(rng) if kind is not LedgerEventType.DENIAL or rng.random() < 0.5 else None,
        model=rng.choice(_MODELS) if kind is not LedgerEventType.DENIAL else None,
        input_tokens=tokens_in if settled else None,
        output_tokens=tokens_out if settled else None,
        cached_input_tokens=rng.randint(0, tokens_in) if settled and rng.random() < 0.3 else None,
        metadata=metadata,
    )


def _agents(conn: Conn, rng: random.Random) -> list[uuid.UUID]:
    agents = [_uuid(rng) for _ in range(AGENTS)]
    now = datetime.now(UTC)
    with conn.transaction():
        for i, agent in enumerate(agents):
            conn.execute(
                "INSERT INTO agents (agent_id, name, owner, status, created_at, updated_at)"
                " VALUES (%s, %s, 'drills@example.com', 'active', %s, %s)",
                (agent, f"tamper-{i}", now, now),
            )
    return agents


def _write_events(conn: Conn, rng: random.Random, agents: Sequence[uuid.UUID]) -> None:
    """The events, by writer transactions of ``CHUNK``; after each, one that fails (its ids stay unused)."""
    at = START
    events = []
    for _ in range(EVENTS):
        at += timedelta(milliseconds=rng.randint(200, 3000))
        # one in ten is recorded late (a settlement after later calls): batch time spans overlap
        late = timedelta(milliseconds=rng.randint(0, 20_000)) if rng.random() < 0.1 else timedelta(0)
        events.append(_event(rng, rng.choice(agents), at - late))
    for i in range(0, EVENTS, CHUNK):
        with conn.transaction():
            ledger_store.insert_events(conn, events[i : i + CHUNK])
        with conn.transaction():
            ledger_store.insert_events(conn, [_event(rng, agents[0], at) for _ in range(rng.randint(1, 4))])
            raise psycopg.Rollback()


def _seal(conn: Conn, key: SigningKey, rng: random.Random) -> None:
    """Seal everything, batch by batch, each of a size drawn from ``BATCH_SIZES``."""
    while sealer.seal_pending(
        conn, key, max_batch=rng.randint(*BATCH_SIZES), max_age=timedelta(0), max_batches=1
    ).batches:
        pass


@dataclass(frozen=True)
class Ledger:
    """The sealed ledger as it is before any trial: what the trials draw from, and what comes back."""

    url: str
    key_dir: Path
    trusted: list[VerifyingKey]
    #: A key of the intruder's, by the same name as the real one: a verifier must not trust it.
    intruder: SigningKey
    #: The sealed rows in seq order (seq ``s`` is ``events[s - 1]``), metadata as its jsonb text.
    events: list[dict[str, Any]]
    batches: list[dict[str, Any]]
    state: dict[str, Any]
    #: Event ids the identity skipped (writer transactions rolled back): where a forger slips rows in.
    free_ids: list[int]
    #: Seqs with a free event id just before theirs: a row slipped in there keeps ids growing with seq.
    gaps: list[int]
    #: md5 of every row of the ledger tables, and of their constraints (and event_id's identity kind).
    data_print: str
    schema_print: str

    @property
    def checkpoint(self) -> str:
        """The newest signed checkpoint: what a careful operator keeps (``caracal merkle checkpoint``)."""
        return str(self.batches[-1]["checkpoint"])

    @property
    def start(self) -> datetime:
        return min(b["min_occurred_at"] for b in self.batches)

    @property
    def end(self) -> datetime:
        return max(b["max_occurred_at"] for b in self.batches)

    @property
    def last_event_id(self) -> int:
        return max(int(e["event_id"]) for e in self.events)

    def event(self, seq: int) -> dict[str, Any]:
        return self.events[seq - 1]

    def batch_at(self, seq: int) -> int:
        """Index of the batch holding ``seq``."""
        return bisect.bisect_right([b["first_seq"] for b in self.batches], seq) - 1

    def periods(self, *indices: int) -> tuple[Period, ...]:
        """The time span of each batch with these indices: the periods an operator would verify."""
        chosen = [self.batches[i] for i in sorted(set(indices))]
        return tuple((b["min_occurred_at"], b["max_occurred_at"]) for b in chosen)

    def periods_at(self, *seqs: int) -> tuple[Period, ...]:
        """The periods of the batches holding these seqs."""
        return self.periods(*(self.batch_at(s) for s in seqs))

    def periods_through(self, first: int, last: int) -> tuple[Period, ...]:
        """The periods of the batches holding seqs ``first..last``."""
        return self.periods(*range(self.batch_at(first), self.batch_at(last) + 1))

    def free_id(self, rng: random.Random, after: int, before: int) -> int:
        """An unused event id between two, if the identity skipped one there; else one past the last."""
        lo, hi = bisect.bisect_right(self.free_ids, after), bisect.bisect_left(self.free_ids, before)
        if lo < hi:
            return self.free_ids[rng.randrange(lo, hi)]
        return self.last_event_id + 1 + rng.randrange(1000)


_EVENT_COLUMNS = (
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
    "canonical",
    "merkle_root_id",
)
_DATA_PRINT = """
SELECT concat_ws('/',
    (SELECT md5(string_agg(e::text, '|' ORDER BY e.event_id)) FROM ledger_events e),
    (SELECT md5(string_agg(b::text, '|' ORDER BY b.first_seq)) FROM merkle_batches b),
    (SELECT md5(string_agg(s::text, '|')) FROM merkle_state s),
    (SELECT md5(string_agg(k::text, '|' ORDER BY k.key_name, k.key_id)) FROM merkle_keys k)) AS print
"""
_SCHEMA_PRINT = """
SELECT concat_ws('/',
    (SELECT md5(string_agg(conname || ' ' || pg_get_constraintdef(oid), '|' ORDER BY conname))
       FROM pg_constraint WHERE conrelid IN ('ledger_events'::regclass, 'merkle_batches'::regclass,
                                             'merkle_state'::regclass, 'merkle_keys'::regclass)),
    (SELECT attidentity::text FROM pg_attribute
      WHERE attrelid = 'ledger_events'::regclass AND attname = 'event_id')) AS print
"""


def _print(conn: Conn, query: str) -> str:
    row = conn.execute(query).fetchone()
    assert row is not None
    return str(row["print"])


def _connect(url: str) -> Conn:
    conn = psycopg.connect(url, autocommit=True, row_factory=dict_row)
    conn.execute("SET client_encoding TO 'UTF8'")  # canonical bytes carry text as UTF-8
    return conn


def build(url: str, key_dir: Path, seed: int) -> Ledger:
    """Write the events, make the signing key and seal them all, as production does; read them back."""
    rng = random.Random(seed)
    with _connect(url) as conn:
        _write_events(conn, rng, _agents(conn, rng))
    with Database(url) as db:
        keys.generate(db, key_dir, actor="tamper-drill", at=datetime.now(UTC))
    key = keys.load_signing_key(key_dir)
    with _connect(url) as conn:
        _seal(conn, key, rng)
        conn.execute("VACUUM ANALYZE ledger_events")
        conn.execute("VACUUM ANALYZE merkle_batches")
        columns = ", ".join("metadata::text AS metadata" if c == "metadata" else c for c in _EVENT_COLUMNS)
        events = conn.execute(f"SELECT {columns} FROM ledger_events ORDER BY seq").fetchall()
        batches = conn.execute("SELECT * FROM merkle_batches ORDER BY first_seq").fetchall()
        state = conn.execute("SELECT origin, tree_size, frontier, last_batch_id FROM merkle_state").fetchone()
        data_print, schema_print = _print(conn, _DATA_PRINT), _print(conn, _SCHEMA_PRINT)
    assert state is not None
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(events) + 1)), "every event is sealed, in one gap-free run of seqs"
    ids = {int(e["event_id"]) for e in events}
    free = sorted(set(range(min(ids), max(ids) + 1)) - ids)
    gaps = [e["seq"] for p, e in pairwise(events) if e["event_id"] - p["event_id"] > 1]
    return Ledger(
        url=url,
        key_dir=key_dir,
        trusted=keys.trusted_keys(key_dir),
        intruder=generate_key(key.name),
        events=events,
        batches=batches,
        state=state,
        free_ids=free,
        gaps=gaps,
        data_print=data_print,
        schema_print=schema_print,
    )


# --------------------------------------------------------------------------- tampering


@dataclass(frozen=True, slots=True)
class Tampering:
    what: str
    #: The time spans verified as "the tampered period" (each on its own: a swap touches two batches).
    periods: tuple[Period, ...]
    #: The field, row or structure hit (for the tally by target).
    target: str
    #: A checkpoint remembered from before, for what only it can reveal (a rollback).
    trusted_checkpoint: str | None = None


Variant = Callable[[Conn, Ledger, random.Random], Tampering | None]


def _store(conn: Conn, statement: sql.Composable | str, params: Sequence[Any] | dict[str, Any] = ()) -> bool:
    """Run one tampering statement as a superuser would: a constraint in the way is dropped (inside the
    trial's transaction: it is back at rollback). False when the row is not there or the database cannot
    hold the value (the variant draws again)."""
    for _ in range(8):
        try:
            with conn.transaction():
                cursor = conn.execute(statement, params)
            return cursor.rowcount != 0
        except psycopg.errors.GeneratedAlways:
            conn.execute("ALTER TABLE ledger_events ALTER COLUMN event_id SET GENERATED BY DEFAULT")
        except psycopg.errors.IntegrityError as exc:
            name, table = exc.diag.constraint_name, exc.diag.table_name
            if not name or not table:
                return False
            drop = sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}")
            conn.execute(drop.format(sql.Identifier(table), sql.Identifier(name)))
        except psycopg.errors.DataError:
            return False
    return False


@dataclass(frozen=True, slots=True)
class Codec:
    """A column's value as the bytes a bit flip hits, and back (ValueError: no value of the column)."""

    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]
    cast: str = ""


def _text(data: bytes) -> str:
    text = data.decode()  # PostgreSQL text is UTF-8: invalid bytes raise (a ValueError)
    if "\x00" in text:
        raise ValueError("PostgreSQL text holds no NUL")
    return text


def _micros(at: datetime) -> bytes:
    """A timestamptz as PostgreSQL stores it: int64 microseconds since 2000-01-01 UTC."""
    delta = at - PG_EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return micros.to_bytes(8, "big", signed=True)


def _moment(data: bytes) -> datetime:
    return PG_EPOCH + timedelta(microseconds=int.from_bytes(data, "big", signed=True))


def _integer(width: int) -> Codec:
    return Codec(
        lambda v: int(v).to_bytes(width, "big", signed=True),
        lambda b: int.from_bytes(b, "big", signed=True),
    )


_UUID = Codec(lambda v: v.bytes, lambda b: uuid.UUID(bytes=b))
_INT8 = _integer(8)
_TEXT = Codec(lambda v: str(v).encode(), _text)
_BYTES = Codec(bytes, bytes)
#: numeric(38, 12) as the count of 10^-12 units, 96-bit two's complement (the column holds < 10^26).
_COST = Codec(
    lambda v: int(Decimal(v).scaleb(12)).to_bytes(12, "big", signed=True),
    lambda b: Decimal(int.from_bytes(b, "big", signed=True)).scaleb(-12),
)

EVENT_FIELDS: dict[str, Codec] = {
    "seq": _INT8,
    "event_id": _INT8,
    "idempotency_key": _UUID,
    "event_type": _TEXT,
    "agent_id": _UUID,
    "request_id": _UUID,
    "occurred_at": Codec(_micros, _moment),
    "resource": _TEXT,
    "model": _TEXT,
    "input_tokens": _INT8,
    "output_tokens": _INT8,
    "cached_input_tokens": _INT8,
    "cost": _COST,
    "currency": _TEXT,
    "metadata": Codec(lambda v: str(v).encode(), _text, "::jsonb"),
    "canonical": _BYTES,
    "merkle_root_id": _UUID,
}
MERKLE_FIELDS: dict[tuple[str, str], Codec] = {
    ("merkle_batches", "batch_id"): _UUID,
    ("merkle_batches", "first_seq"): _INT8,
    ("merkle_batches", "last_seq"): _INT8,
    ("merkle_batches", "event_count"): _integer(4),
    ("merkle_batches", "tree_size"): _INT8,
    ("merkle_batches", "previous_tree_size"): _INT8,
    ("merkle_batches", "root_hash"): _BYTES,
    ("merkle_batches", "start_frontier"): _BYTES,
    ("merkle_batches", "consistency_proof"): _BYTES,
    ("merkle_batches", "leaf_hashes"): _BYTES,
    ("merkle_batches", "block_hashes"): _BYTES,
    ("merkle_batches", "checkpoint"): _TEXT,
    ("merkle_state", "tree_size"): _INT8,
    ("merkle_state", "frontier"): _BYTES,
    ("merkle_state", "last_batch_id"): _UUID,
    ("merkle_state", "origin"): _TEXT,
}


#: Bits drawn in one field before another field is drawn (a flip the column cannot hold is drawn again).
FLIPS = 64


def _flipped(rng: random.Random, codec: Codec, value: Any) -> Any:
    """``value`` with one bit of one of its bytes flipped (ValueError: nothing the column can hold)."""
    data = bytearray(codec.encode(value))
    if not data:
        raise ValueError("no bytes to flip")
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    try:
        return codec.decode(bytes(data))
    except OverflowError as exc:  # a time past year 9999
        raise ValueError(str(exc)) from None


def _flip(
    conn: Conn, rng: random.Random, codec: Codec, value: Any, statement: sql.Composed, key: Any
) -> bool:
    """Store ``value`` with one bit flipped, by ``statement`` (``%(value)s``, ``%(key)s``): drawn again,
    in the same field, until the column holds it."""
    for _ in range(FLIPS):
        try:
            flipped = _flipped(rng, codec, value)
        except ValueError:
            continue
        if _store(conn, statement, {"value": flipped, "key": key}):
            return True
    return False


def flip_event_field(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    column = rng.choice(list(EVENT_FIELDS))
    row = rng.choice([e for e in ledger.events if e[column] is not None])
    codec = EVENT_FIELDS[column]
    statement = sql.SQL("UPDATE ledger_events SET {} = %(value)s{} WHERE event_id = %(key)s").format(
        sql.Identifier(column), sql.SQL(codec.cast)
    )
    if column == "metadata":  # jsonb keeps one spelling of a document: a flip it undoes is no change
        statement += sql.SQL(" AND metadata::text <> (%(value)s::jsonb)::text")
    if not _flip(conn, rng, codec, row[column], statement, row["event_id"]):
        return None
    what = f"bit flip in {column} of event {row['event_id']} (seq {row['seq']})"
    return Tampering(what, ledger.periods_at(row["seq"]), column)


def flip_merkle_field(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    table, column = rng.choice(list(MERKLE_FIELDS))
    codec = MERKLE_FIELDS[table, column]
    statement = sql.SQL("UPDATE {} SET {} = %(value)s").format(sql.Identifier(table), sql.Identifier(column))
    if table == "merkle_state":  # one row
        index, row = len(ledger.batches) - 1, ledger.state
        statement += sql.SQL(" WHERE %(key)s")
        key: Any = True
    else:
        index = rng.randrange(len(ledger.batches))
        row = ledger.batches[index]
        statement += sql.SQL(" WHERE batch_id = %(key)s")
        key = row["batch_id"]
    if not _flip(conn, rng, codec, row[column], statement, key):
        return None
    where = "the tree state" if table == "merkle_state" else f"batch {index + 1}"
    return Tampering(f"bit flip in {column} of {where}", ledger.periods(index), f"{table}.{column}")


# -- deletions


def _delete_seqs(conn: Conn, ledger: Ledger, first: int, last: int, target: str) -> Tampering:
    conn.execute("DELETE FROM ledger_events WHERE seq BETWEEN %s AND %s", (first, last))
    return Tampering(f"deleted {target} (seq {first}..{last})", ledger.periods_through(first, last), target)


def delete_event(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    seq = rng.randint(1, len(ledger.events))
    return _delete_seqs(conn, ledger, seq, seq, "an event")


def delete_batch_edge(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    batch = rng.choice(ledger.batches)
    seq = batch[rng.choice(["first_seq", "last_seq"])]
    return _delete_seqs(conn, ledger, seq, seq, "the first or last event of a batch")


def delete_last_event(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    seq = len(ledger.events)
    return _delete_seqs(conn, ledger, seq, seq, "the ledger's last event")


def delete_run(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    length = rng.randint(2, 40)
    first = rng.randint(1, len(ledger.events) - length + 1)
    return _delete_seqs(conn, ledger, first, first + length - 1, "a run of events")


def delete_batch_events(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    batch = rng.choice(ledger.batches)
    return _delete_seqs(conn, ledger, batch["first_seq"], batch["last_seq"], "a batch's events")


def delete_batch_row(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    index = rng.randrange(len(ledger.batches))
    conn.execute("DELETE FROM merkle_batches WHERE batch_id = %s", (ledger.batches[index]["batch_id"],))
    return Tampering(f"deleted the row of batch {index + 1}", ledger.periods(index), "a batch row")


def delete_batch_with_events(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    index = rng.randrange(len(ledger.batches))
    batch = ledger.batches[index]
    conn.execute("DELETE FROM ledger_events WHERE merkle_root_id = %s", (batch["batch_id"],))
    conn.execute("DELETE FROM merkle_batches WHERE batch_id = %s", (batch["batch_id"],))
    what = f"deleted batch {index + 1} with its events"
    return Tampering(what, ledger.periods(index), "a batch with its events")


def delete_state(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    conn.execute("DELETE FROM merkle_state")
    return Tampering("deleted the tree state", ledger.periods(len(ledger.batches) - 1), "the tree state")


def roll_back_tail(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    """The last batch, its events and the tree state behind it: consistent on its own, but not with the
    checkpoint the operator kept."""
    last, before = ledger.batches[-1], ledger.batches[-2]
    conn.execute("DELETE FROM ledger_events WHERE merkle_root_id = %s", (last["batch_id"],))
    conn.execute("DELETE FROM merkle_batches WHERE batch_id = %s", (last["batch_id"],))
    conn.execute(
        "UPDATE merkle_state SET tree_size = %s, frontier = %s, last_batch_id = %s",
        (last["previous_tree_size"], last["start_frontier"], before["batch_id"]),
    )
    period = ledger.periods(len(ledger.batches) - 1)
    what = "rolled back the last batch (events, batch row and tree state)"
    return Tampering(what, period, "rollback of the tail", ledger.checkpoint)


# -- insertions

_INSERT = """
INSERT INTO ledger_events (event_id, idempotency_key, event_type, agent_id, request_id, occurred_at,
                           recorded_at, resource, model, input_tokens, output_tokens, cached_input_tokens,
                           cost, currency, metadata, seq, merkle_root_id, canonical)
OVERRIDING SYSTEM VALUE
SELECT %(event_id)s, %(key)s, src.event_type, src.agent_id, %(request)s, %(at)s,
       coalesce(%(recorded)s, now()), src.resource, src.model, src.input_tokens, src.output_tokens,
       src.cached_input_tokens, src.cost + %(extra)s, src.currency, src.metadata, %(seq)s, %(batch)s,
       CASE WHEN %(seq)s::bigint IS NULL THEN NULL ELSE '\\x01'::bytea END
  FROM ledger_events src WHERE src.event_id = %(like)s
"""
# The forger's canonical bytes: the true encoding of the forged columns (what the sealer would have stored).
_ENCODE = f"UPDATE ledger_events e SET canonical = {CANONICAL_SQL} WHERE e.event_id = %s"


def _forge(
    conn: Conn,
    ledger: Ledger,
    rng: random.Random,
    *,
    event_id: int,
    at: datetime,
    seq: int | None = None,
    batch: uuid.UUID | None = None,
    recorded: datetime | None = None,
) -> bool:
    """A plausible row: a copy of a random one with its own keys, time and a little more cost."""
    params = {
        "event_id": event_id,
        "key": _uuid(rng),
        "request": _uuid(rng),
        "at": at,
        "recorded": recorded,
        "extra": Decimal(rng.randint(1, 999_999)).scaleb(-8),
        "seq": seq,
        "batch": batch,
        "like": rng.choice(ledger.events)["event_id"],
    }
    if not _store(conn, _INSERT, params):
        return False
    if seq is not None:
        conn.execute(_ENCODE, (event_id,))
    return True


def _slot(ledger: Ledger, rng: random.Random, seq: int) -> tuple[int, int, datetime]:
    """Where to slip a row in before ``seq``: ``(seq, an event id between its neighbours' if one is free,
    a time just before its)``."""
    row = ledger.event(seq)
    after = ledger.event(seq - 1)["event_id"] if seq > 1 else 0
    at = row["occurred_at"] - timedelta(milliseconds=rng.randint(1, 900))
    return seq, ledger.free_id(rng, after, row["event_id"]), at


def insert_at_sealed_seq(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    """The forged row where an id is free, so that nothing but its seq and its leaf give it away."""
    seq, event_id, at = _slot(ledger, rng, rng.choice(ledger.gaps))
    batch = ledger.event(seq)["merkle_root_id"]
    if not _forge(conn, ledger, rng, event_id=event_id, at=at, seq=seq, batch=batch):
        return None
    what = f"forged event {event_id} at seq {seq}, encoded consistently"
    return Tampering(what, ledger.periods_at(seq), "a forged row at a sealed seq")


#: Far above any seq: where rows wait while the others are renumbered.
_ASIDE = 10**12


def insert_renumbered(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    """The careful forger: every later row moves up one seq, is re-encoded and names the batch its new seq
    falls in (the last one, past every batch, keeps the last batch)."""
    seq, event_id, at = _slot(ledger, rng, rng.choice(ledger.gaps))
    # up by one in two steps (out of the way, then back), so the seqs stay unique all along
    conn.execute("UPDATE ledger_events SET seq = seq + %s WHERE seq >= %s", (_ASIDE, seq))
    conn.execute("UPDATE ledger_events SET seq = seq - %s + 1 WHERE seq >= %s", (_ASIDE, _ASIDE + seq))
    batch = ledger.event(seq)["merkle_root_id"]
    if not _forge(conn, ledger, rng, event_id=event_id, at=at, seq=seq, batch=batch):
        return None
    conn.execute(
        f"UPDATE ledger_events e SET canonical = {CANONICAL_SQL},"
        "   merkle_root_id = coalesce((SELECT b.batch_id FROM merkle_batches b"
        "                               WHERE e.seq BETWEEN b.first_seq AND b.last_seq), e.merkle_root_id)"
        " WHERE e.seq > %s",
        (seq,),
    )
    what = f"forged event {event_id} at seq {seq}, later rows renumbered and re-encoded"
    return Tampering(what, ledger.periods_at(seq), "a forged row, the rest renumbered")


def insert_past_tail(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    seq = len(ledger.events) + 1
    last = ledger.batches[-1]
    at = last["max_occurred_at"] - timedelta(milliseconds=rng.randint(0, 5000))
    event_id = ledger.last_event_id + 1 + rng.randrange(100)
    if not _forge(conn, ledger, rng, event_id=event_id, at=at, seq=seq, batch=last["batch_id"]):
        return None
    what = f"forged event {event_id} at seq {seq}, past the last batch"
    return Tampering(what, ledger.periods(len(ledger.batches) - 1), "a forged row past the last batch")


def insert_backdated(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    """An unsealed row that says it occurred, and was recorded, inside a sealed period."""
    seq, event_id, at = _slot(ledger, rng, rng.randint(1, len(ledger.events)))
    recorded = at + timedelta(seconds=rng.randint(1, 120))
    if not _forge(conn, ledger, rng, event_id=event_id, at=at, recorded=recorded):
        return None
    what = f"forged unsealed event {event_id}, backdated to {at:%Y-%m-%dT%H:%M:%SZ}"
    return Tampering(what, ledger.periods_at(seq), "a backdated unsealed row")


def append_forged_batch(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    """Forged events sealed by the production sealer under the intruder's key, registered in place of the
    real one (which the database lets a superuser retire)."""
    count = rng.randint(1, 40)
    first_id = ledger.last_event_id + 1 + rng.randrange(100)
    times = [ledger.end + timedelta(seconds=1 + i) for i in range(count)]
    for i, at in enumerate(times):
        if not _forge(conn, ledger, rng, event_id=first_id + i, at=at):
            return None
    now = datetime.now(UTC)
    conn.execute("UPDATE merkle_keys SET retired_at = %s WHERE retired_at IS NULL", (now,))
    keys.register(conn, ledger.intruder.public(), now)
    sealed = sealer.seal_pending(conn, ledger.intruder, max_batch=1000, max_age=timedelta(0))
    assert sealed.events == count, "the forged events are sealed"
    what = f"{count} forged events appended in a batch signed by an intruder's key"
    return Tampering(what, ((times[0], times[-1]),), "a forged batch appended")


# -- swaps

#: The columns of what happened (everything encoded but seq and event_id).
PAYLOAD = _EVENT_COLUMNS[2:15]


def _columns(conn: Conn, table: str) -> list[str]:
    cursor = conn.execute(sql.SQL("SELECT * FROM {} LIMIT 0").format(sql.Identifier(table)))
    return [c.name for c in cursor.description or []]


def _swap(conn: Conn, table: str, key: str, a: Any, b: Any, columns: Sequence[str]) -> bool:
    """Trade ``columns`` between the rows keyed ``a`` and ``b``: both deleted and written back with those
    values traded, in one statement (no unique constraint is in the way, so none is dropped)."""
    every = _columns(conn, table)
    values = sql.SQL(", ").join(
        sql.SQL("{}.{}").format(sql.Identifier("o" if c in columns else "x"), sql.Identifier(c))
        for c in every
    )
    statement = sql.SQL(
        "WITH gone AS (DELETE FROM {t} WHERE {k} IN (%(a)s, %(b)s) RETURNING *)"
        " INSERT INTO {t} ({c}) OVERRIDING SYSTEM VALUE SELECT {v} FROM gone x JOIN gone o ON o.{k} <> x.{k}"
    ).format(
        t=sql.Identifier(table),
        k=sql.Identifier(key),
        c=sql.SQL(", ").join(map(sql.Identifier, every)),
        v=values,
    )
    return _store(conn, statement, {"a": a, "b": b})


def _swap_events(
    conn: Conn, ledger: Ledger, a: dict[str, Any], b: dict[str, Any], columns: Sequence[str], target: str
) -> Tampering | None:
    if all(a[c] == b[c] for c in columns) or not _swap(
        conn, "ledger_events", "event_id", a["event_id"], b["event_id"], columns
    ):
        return None
    what = f"swapped {', '.join(columns)} of seq {a['seq']} and {b['seq']}"
    return Tampering(what, ledger.periods_at(a["seq"], b["seq"]), target)


def _two(ledger: Ledger, rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    a, b = rng.sample(ledger.events, 2)
    return a, b


def swap_adjacent_seqs(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    seq = rng.randint(1, len(ledger.events) - 1)
    a, b = ledger.event(seq), ledger.event(seq + 1)
    return _swap_events(conn, ledger, a, b, ["seq"], "seqs of neighbours")


def swap_seqs(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    return _swap_events(conn, ledger, *_two(ledger, rng), ["seq"], "seqs")


def swap_positions(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    return _swap_events(conn, ledger, *_two(ledger, rng), ["seq", "canonical"], "positions")


def swap_slots(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    a, b = _two(ledger, rng)
    if a["merkle_root_id"] == b["merkle_root_id"]:
        return None  # a whole slot moves to another batch: two rows of different batches
    return _swap_events(conn, ledger, a, b, ["seq", "canonical", "merkle_root_id"], "slots across batches")


def swap_contents(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    return _swap_events(conn, ledger, *_two(ledger, rng), PAYLOAD, "contents")


def swap_column(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    column = rng.choice(PAYLOAD)
    return _swap_events(conn, ledger, *_two(ledger, rng), [column], f"one column ({column})")


def swap_event_ids(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    return _swap_events(conn, ledger, *_two(ledger, rng), ["event_id"], "event ids")


def swap_canonical(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    return _swap_events(conn, ledger, *_two(ledger, rng), ["canonical"], "canonical bytes")


_BATCH_SWAPS = (
    ("checkpoint",),
    ("root_hash",),
    ("start_frontier", "consistency_proof"),
    ("batch_id",),
    ("leaf_hashes", "block_hashes"),
)


def swap_batch_data(conn: Conn, ledger: Ledger, rng: random.Random) -> Tampering | None:
    i, j = sorted(rng.sample(range(len(ledger.batches)), 2))
    columns = rng.choice(_BATCH_SWAPS)
    a, b = ledger.batches[i]["batch_id"], ledger.batches[j]["batch_id"]
    if not _swap(conn, "merkle_batches", "batch_id", a, b, columns):
        return None
    what = f"swapped {', '.join(columns)} of batches {i + 1} and {j + 1}"
    return Tampering(what, ledger.periods(i, j), f"batches' {' and '.join(columns)}")


KINDS: dict[str, tuple[Variant, ...]] = {
    "bit flip, event row": (flip_event_field,),
    "bit flip, Merkle data": (flip_merkle_field,),
    "deletion": (
        delete_event,
        delete_batch_edge,
        delete_last_event,
        delete_run,
        delete_batch_events,
        delete_batch_row,
        delete_batch_with_events,
        delete_state,
        roll_back_tail,
    ),
    "insertion": (
        insert_at_sealed_seq,
        insert_renumbered,
        insert_past_tail,
        insert_backdated,
        append_forged_batch,
    ),
    "swap": (
        swap_adjacent_seqs,
        swap_seqs,
        swap_positions,
        swap_slots,
        swap_contents,
        swap_column,
        swap_event_ids,
        swap_canonical,
        swap_batch_data,
    ),
}
_VARIANTS: dict[str, Variant] = {v.__name__: v for variants in KINDS.values() for v in variants}


@dataclass(frozen=True, slots=True)
class Plan:
    """One trial, drawn up front: it applies the same way to the ledger and to any copy of it."""

    number: int
    kind: str
    variant: str
    seed: int


def plans(rng: random.Random, count: int) -> list[Plan]:
    out = []
    for number in range(1, count + 1):
        kind = rng.choice(list(KINDS))
        out.append(Plan(number, kind, rng.choice(KINDS[kind]).__name__, rng.getrandbits(64)))
    return out


def apply(conn: Conn, ledger: Ledger, plan: Plan) -> Tampering:
    """Tamper as the plan says, inside the caller's transaction (guard triggers already off)."""
    rng = random.Random(plan.seed)
    variant = _VARIANTS[plan.variant]
    for _ in range(ATTEMPTS):
        with conn.transaction():
            done = variant(conn, ledger, rng)
            if done is None:
                raise psycopg.Rollback()  # nothing the database would hold: draw again
        if done is not None:
            return done
    raise RuntimeError(f"trial {plan.number}: {plan.variant} found nothing to tamper with")


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True, slots=True)
class Check:
    ok: bool
    #: The first problem's kind ('' when ok; 'error: ...' when the verifier raised instead of reporting).
    problem: str
    seconds: float
    events_checked: int = 0

    @property
    def raised(self) -> bool:
        return self.problem.startswith("error")


def verify(conn: Conn, ledger: Ledger, period: Period, trusted_checkpoint: str | None = None) -> Check:
    """``caracal merkle verify-range``'s verification, on this connection (so it sees the tampering)."""
    started = time.perf_counter()
    try:
        with conn.transaction():  # a savepoint: an error leaves the trial's transaction usable
            result = verifier.verify_range(
                conn, period[0], period[1], ledger.trusted, trusted_checkpoint=trusted_checkpoint
            )
    except Exception as exc:  # broken by the tampering: not a PASSED, but worth reading
        return Check(False, f"error: {type(exc).__name__}: {exc}", time.perf_counter() - started)
    first = result.first_problem
    seconds = time.perf_counter() - started
    return Check(result.ok, first.kind if first else "", seconds, result.events_checked)


def verify_each(conn: Conn, ledger: Ledger, tampering: Tampering) -> Check:
    """Each tampered period verified on its own: a miss if any of them passes."""
    checks = [verify(conn, ledger, p, tampering.trusted_checkpoint) for p in tampering.periods]
    passed = [c for c in checks if c.ok]
    return Check(
        ok=bool(passed),
        problem="" if passed else checks[0].problem,
        seconds=sum(c.seconds for c in checks),
        events_checked=(passed or checks)[0].events_checked,
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    plan: Plan
    tampering: Tampering
    period: Check
    #: The whole ledger verified too (every ``WHOLE_EVERY``-th trial, and each one the period check passed).
    whole: Check | None
    #: Whether the tables differ from the clean ledger (asked only when a check passed).
    changed: bool = True

    @property
    def detected(self) -> bool:
        return not self.period.ok and (self.whole is None or not self.whole.ok)


def trial(conn: Conn, ledger: Ledger, plan: Plan) -> Outcome:
    with conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL session_replication_role = replica")  # the guard triggers off
        tampering = apply(conn, ledger, plan)
        conn.execute("SET LOCAL session_replication_role = origin")
        period = verify_each(conn, ledger, tampering)
        whole = None
        if period.ok or plan.number % WHOLE_EVERY == 0:
            whole = verify(conn, ledger, ALL_TIME, tampering.trusted_checkpoint)
        changed = True
        if period.ok or (whole is not None and whole.ok):  # a miss: make sure the data did change
            changed = _print(conn, _DATA_PRINT) != ledger.data_print
    return Outcome(plan, tampering, period, whole, changed)


def clean_checks(conn: Conn, ledger: Ledger, rng: random.Random) -> list[Check]:
    """The clean ledger: whole, over one batch's period, and against the kept checkpoint."""
    index = rng.randrange(len(ledger.batches))
    with conn.transaction(force_rollback=True):
        return [
            verify(conn, ledger, ALL_TIME),
            verify(conn, ledger, ledger.periods(index)[0]),
            verify(conn, ledger, ALL_TIME, ledger.checkpoint),
        ]


def drill(
    ledger: Ledger, todo: Sequence[Plan], rng: random.Random
) -> tuple[list[Outcome], list[Check], bool]:
    """Every trial, with clean verifications around them; and whether the ledger came back intact."""
    outcomes: list[Outcome] = []
    clean: list[Check] = []
    every = max(1, round(len(todo) * CLEAN_EVERY))
    with _connect(ledger.url) as conn:
        clean += clean_checks(conn, ledger, rng)
        for plan in todo:
            outcomes.append(trial(conn, ledger, plan))
            if plan.number % every == 0 or plan.number == len(todo):
                clean += clean_checks(conn, ledger, rng)
        intact = (_print(conn, _DATA_PRINT), _print(conn, _SCHEMA_PRINT)) == (
            ledger.data_print,
            ledger.schema_print,
        )
    return outcomes, clean, intact


# --------------------------------------------------------------------------- the command itself


@dataclass(frozen=True, slots=True)
class CliVerdict:
    what: str
    exit_code: int
    integrity: str
    problem: str

    def failed(self) -> bool:
        """Exit 1 and no PASSED: ``FAILED``, or the command's one-line error."""
        return self.exit_code == 1 and self.integrity != "PASSED"

    def passed(self) -> bool:
        return self.exit_code == 0 and self.integrity == "PASSED"


def _caracal() -> list[str]:
    """The installed ``caracal`` command (beside this interpreter, else on PATH)."""
    beside = Path(sys.executable).with_name("caracal")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("caracal")
    if found:
        return [found]
    return [sys.executable, "-c", "from caracal_ops.cli.main import run; run()"]


def _run_cli(url: str, ledger: Ledger, tampering: Tampering | None, folder: Path) -> CliVerdict:
    command = [*_caracal(), "merkle", "verify-range", "--format", "json"]
    command += ["--start-time", (ledger.start - timedelta(days=1)).isoformat(), "--end-time", "now"]
    if tampering is not None and tampering.trusted_checkpoint is not None:
        kept = folder / "trusted.checkpoint"
        kept.write_text(tampering.trusted_checkpoint)
        command += ["--trusted-checkpoint", str(kept)]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CARACAL")}  # no stray config
    environment |= {"CARACAL_DATABASE_URL": url, "CARACAL__INTEGRITY__KEY_DIR": str(ledger.key_dir)}
    done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300, check=False)
    try:
        answer = json.loads(done.stdout)
        integrity, problem = str(answer["integrity"]), str(answer.get("problem") or "")
    except (ValueError, KeyError, TypeError):
        integrity, problem = "no verdict", (done.stderr.strip().splitlines() or [""])[-1]
    what = tampering.what if tampering is not None else "the clean ledger"
    return CliVerdict(what, done.returncode, integrity, problem)


def cli_checks(env: TamperEnv, ledger: Ledger, todo: Sequence[Plan]) -> list[CliVerdict]:
    """The real command on copies of the ledger: untouched, then with the first trial of each kind
    committed. The first verdict is the clean copy's."""
    template = conninfo_to_dict(ledger.url)["dbname"]
    firsts: dict[str, Plan] = {}
    for plan in todo:
        firsts.setdefault(plan.kind, plan)
    folder = env.folder(DRILL)
    return [_cli_on_copy(env, ledger, str(template), plan, folder) for plan in [None, *firsts.values()]]


def _cli_on_copy(
    env: TamperEnv, ledger: Ledger, template: str, plan: Plan | None, folder: Path
) -> CliVerdict:
    name = f"caracal_tamper_cli_{uuid.uuid4().hex[:8]}"
    url = env.postgres.create_database(name, template=template)
    try:
        tampering = None
        if plan is not None:
            with _connect(url) as conn, conn.transaction():
                conn.execute("SET LOCAL session_replication_role = replica")
                tampering = apply(conn, ledger, plan)
        return _run_cli(url, ledger, tampering, folder)
    finally:
        env.postgres.drop_database(name)


# --------------------------------------------------------------------------- the rows


def _rate(found: int, total: int) -> str:
    return f"{found:,}/{total:,} ({100 * found / total:.2f}%)" if total else "0/0"


def _detection(measure: str, outcomes: Sequence[Outcome], hit: Callable[[Outcome], bool]) -> Row:
    found = sum(1 for o in outcomes if hit(o))
    return invariant(DRILL, measure, _rate(found, len(outcomes)), found == len(outcomes) > 0, "100%")


def _ms(values: Sequence[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[max(int(len(ordered) * 0.99) - 1, 0)]
    return f"p50 {statistics.median(ordered) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"


def _missed(outcomes: Sequence[Outcome], missed: Callable[[Outcome], bool]) -> str:
    """``target missed/tried`` for each target with a miss."""
    tried = Counter(o.tampering.target for o in outcomes)
    misses = Counter(o.tampering.target for o in outcomes if missed(o))
    return "; ".join(f"{t} {n}/{tried[t]}" for t, n in misses.most_common()) or "none"


def detection_rows(outcomes: Sequence[Outcome]) -> list[Row]:
    out = []
    for kind in KINDS:
        mine = [o for o in outcomes if o.plan.kind == kind]
        out.append(_detection(f"detected: {kind} (tampered period)", mine, lambda o: not o.period.ok))
    out.append(_detection("detected: all kinds (tampered period)", outcomes, lambda o: not o.period.ok))
    whole = [o for o in outcomes if o.whole is not None]
    out.append(
        _detection(
            "detected: all kinds (whole ledger; 1 trial in 4, and each period miss)",
            whole,
            lambda o: not (o.whole and o.whole.ok),
        )
    )
    out.append(info(DRILL, "missed (tampered period), by target", _missed(outcomes, lambda o: o.period.ok)))
    out.append(
        info(
            DRILL, "missed (whole ledger), by target", _missed(whole, lambda o: bool(o.whole and o.whole.ok))
        )
    )
    raised = Counter(
        f"{o.tampering.target}: {c.problem.removeprefix('error: ')}"
        for o in outcomes
        for c in (o.period, o.whole)
        if c is not None and c.raised
    )
    if raised:
        text = "; ".join(f"{k} ({n})" for k, n in raised.most_common())
        out.append(info(DRILL, "verifications that raised instead of reporting FAILED", text))
    return out


def cli_rows(cli: Sequence[CliVerdict]) -> list[Row]:
    clean, tampered = cli[0], cli[1:]
    failed = sum(1 for v in tampered if v.failed())
    verdicts = Counter(f"{v.integrity}, exit {v.exit_code}" for v in tampered)
    return [
        invariant(
            DRILL,
            "caracal merkle verify-range (CLI), first trial of each kind",
            ", ".join(f"{k}: {n}/{len(tampered)}" for k, n in verdicts.most_common()),
            failed == len(tampered) > 0,
            "FAILED, exit 1 on each",
        ),
        invariant(
            DRILL,
            "caracal merkle verify-range (CLI), clean ledger",
            f"{clean.integrity}, exit {clean.exit_code}",
            clean.passed(),
            "PASSED, exit 0",
        ),
    ]


def rows(
    ledger: Ledger,
    outcomes: Sequence[Outcome],
    clean: Sequence[Check],
    intact: bool,
    cli: Sequence[CliVerdict],
    seconds: dict[str, float],
) -> list[Row]:
    real = [o for o in outcomes if o.changed]
    sizes = [int(b["event_count"]) for b in ledger.batches]
    by_kind = Counter(o.plan.kind for o in real)
    ledger_text = (
        f"{len(ledger.events):,} events in {len(sizes)} signed batches ({min(sizes)}-{max(sizes)} each)"
    )
    out = [
        info(DRILL, "ledger under test", ledger_text),
        info(DRILL, "trials", f"{len(real):,} ({', '.join(f'{k} {n}' for k, n in by_kind.items())})"),
    ]
    if len(real) != len(outcomes):  # a drill bug, not the verifier's: shown, never counted
        out.append(info(DRILL, "trials that changed nothing (not counted)", len(outcomes) - len(real)))
    out += detection_rows(real)
    alarms = sum(1 for c in clean if not c.ok)
    alarm_text = f"{alarms} in {len(clean)} verifications"
    out.append(invariant(DRILL, "false alarms on the clean ledger", alarm_text, alarms == 0, "0"))
    restored = "identical" if intact else "CHANGED"
    out.append(
        invariant(DRILL, "clean ledger after the trials (rows, constraints)", restored, intact, "identical")
    )
    out += cli_rows(cli)
    out.append(
        info(DRILL, "verification per trial (tampered period)", _ms([o.period.seconds for o in outcomes]))
    )
    whole = [o.whole.seconds for o in outcomes if o.whole is not None]
    out.append(info(DRILL, "verification per trial (whole ledger)", _ms(whole)))
    problems = Counter(o.period.problem.split(":")[0] for o in real if not o.period.ok)
    out.append(
        info(DRILL, "first problem reported", ", ".join(f"{k} {n}" for k, n in problems.most_common()))
    )
    out.append(info(DRILL, "drill time", ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())))
    return out


# --------------------------------------------------------------------------- entry points


def _say(text: str) -> None:
    print(f"tamper: {text}", flush=True)


def _tell_misses(outcomes: Sequence[Outcome], cli: Sequence[CliVerdict]) -> None:
    """Each miss, with what it takes to replay it (the plan's variant and seed)."""
    for o in outcomes:
        if o.detected and o.changed:
            continue
        whole = "not run" if o.whole is None else (o.whole.problem or "PASSED")
        seen = (
            f"period {o.period.problem or 'PASSED'} ({o.period.events_checked} events checked), whole {whole}"
        )
        change = "" if o.changed else " (changed nothing)"
        plan = f"trial {o.plan.number} ({o.plan.variant}, seed {o.plan.seed})"
        _say(f"NOT DETECTED: {plan}: {o.tampering.what}{change}: {seen}")
    for v in cli:
        _say(f"CLI on {v.what}: {v.integrity}, exit {v.exit_code}" + (f" ({v.problem})" if v.problem else ""))


def run(env: TamperEnv, trials: int | None = None) -> list[Row]:
    count = trials if trials is not None else (QUICK_TRIALS if env.quick else TRIALS)
    rng = random.Random(env.seed)
    started = time.perf_counter()
    ledger = build(env.database(DRILL), env.folder(DRILL) / "keys", rng.getrandbits(64))
    built = time.perf_counter()
    _say(f"{len(ledger.events):,} events sealed in {len(ledger.batches)} batches ({built - started:.1f} s)")
    todo = plans(rng, count)
    cli = cli_checks(env, ledger, todo)  # while nothing else is connected: the ledger is their template
    checked = time.perf_counter()
    outcomes, clean, intact = drill(ledger, todo, rng)
    done = time.perf_counter()
    _tell_misses(outcomes, cli)
    seconds = {"build": built - started, "CLI": checked - built, "trials": done - checked}
    return rows(ledger, outcomes, clean, intact, cli, seconds)


@dataclass
class PostgresOnly:
    """The part of :class:`bench.drills.env.DrillEnv` this drill needs: alone it needs no Redis or Kafka."""

    postgres: PostgresService
    workdir: Path
    quick: bool = False
    seed: int = 0
    databases: list[str] = field(default_factory=list)

    def database(self, purpose: str) -> str:
        name = f"caracal_{purpose}_{uuid.uuid4().hex[:8]}"
        url = self.postgres.create_database(name)
        migrate(url)
        self.databases.append(name)
        return url

    def folder(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def close(self) -> None:
        for name in self.databases:
            self.postgres.drop_database(name)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self.postgres.managed:
            self.postgres.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--postgres-uri", help="a running PostgreSQL (superuser); default: start one")
    parser.add_argument(
        "--trials", type=int, default=None, help=f"default {TRIALS:,} ({QUICK_TRIALS} with --quick)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print("starting PostgreSQL ..." if not args.postgres_uri else "using the given PostgreSQL", flush=True)
    postgres = PostgresService.external(args.postgres_uri) if args.postgres_uri else PostgresService.start()
    env = PostgresOnly(postgres, Path(tempfile.mkdtemp(prefix="caracal-tamper-")), args.quick, args.seed)
    try:
        table = run(env, args.trials)
    finally:
        env.close()
    print(report.markdown(table))
    return 1 if report.broken(table) else 0


if __name__ == "__main__":
    sys.exit(main())
