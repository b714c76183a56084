"""Placing ledger events in the Merkle tree as they are written.

The ledger writer inserts each event with its place already set: its seq (the next free position, gap-free),
the id of the batch it will be sealed in, and its canonical bytes, which PostgreSQL computes from the columns
in the same ``INSERT`` (:func:`caracald.integrity.encoding.canonical_sql`). Every row is written once; the
sealer then only closes batches: it reads their canonical bytes by seq, hashes, signs
(:mod:`caracald.integrity.sealer`). Sealing by an ``UPDATE`` afterwards, for rows inserted without a place,
still works and costs a second version of every row, which is why the writer does not leave it to the sealer.

The writer fills the open batch (the one the newest placed event is in) up to ``max_batch`` events, then
opens new ones; the sealer closes a batch when it is full, when a later batch has begun, or when its oldest
event has waited ``max_age``. Placing takes an advisory lock, held by the writer until its transaction ends,
so seqs stay gap-free with any number of writers; the sealer takes it too unless a later batch has begun
(then no writer adds to the batch again), so a batch is never closed while a writer is adding to it, and a
writer is never held up by the sealing of batches it has left behind. Within a batch, seqs follow event ids
(the verifier checks it): the writer draws the ids from the identity sequence under the lock, in the order the
events came, and numbers them in that order.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Final

from psycopg.rows import tuple_row

from caracald.integrity.batches import AnyConnection
from caracald.integrity.encoding import canonical_sql

#: Serialises placing, and sealing a batch that may still be filling (the event log uses 0x0CA7E100,
#: migrations 0x0CA7AC41, the audit chain 0x0CA7A0D1, the sealers 0x0CA7B47D).
SEAL_LOCK_KEY: Final = 0x0CA7B47C

#: Events per batch unless configured (integrity.batch_size).
DEFAULT_MAX_BATCH: Final = 1000


@dataclass(frozen=True, slots=True)
class Head:
    """Where the tree's placed events end: the last seq given, and the open batch (None when the last
    placed event is sealed: the next event opens a batch)."""

    sealed: int  # events sealed into closed batches (merkle_state.tree_size)
    top: int  # the highest seq given
    open_batch: uuid.UUID | None
    open_count: int  # events already in the open batch

    def room(self, max_batch: int) -> int:
        return max(max_batch - self.open_count, 0) if self.open_batch is not None else 0


# count(*), not min(seq): the planner would answer a min by walking the seq index from its start.
_HEAD = """
SELECT s.tree_size, t.seq, t.merkle_root_id,
       (SELECT count(*) FROM ledger_events o WHERE o.merkle_root_id = t.merkle_root_id) AS open_count
  FROM merkle_state s
  LEFT JOIN LATERAL (
        SELECT seq, merkle_root_id FROM ledger_events WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1
  ) t ON true
"""


def lock(conn: AnyConnection) -> None:
    """Take the placing and sealing lock until the current transaction ends."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (SEAL_LOCK_KEY,))


def try_lock(conn: AnyConnection) -> bool:
    """Take the placing and sealing lock until the current transaction ends, unless someone holds it."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (SEAL_LOCK_KEY,)).fetchone()
    return bool(row and row[0])


def head(conn: AnyConnection) -> Head | None:
    """The tree's head, read under :func:`lock`; None when ``merkle_state`` has no row (deleted: then events
    are written without a place, and the sealer and the verifier say what is wrong)."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(_HEAD).fetchone()
    if row is None:
        return None
    sealed, top, open_batch, open_count = int(row[0]), row[1], row[2], int(row[3])
    if top is None or top <= sealed:
        return Head(sealed, max(sealed, top or 0), None, 0)
    return Head(sealed, int(top), open_batch, open_count)


def insert_sql(staging: str, columns: tuple[str, ...], *, skip_recorded: bool) -> str:
    """``INSERT`` the events of the temporary table ``staging`` (its ``columns`` plus an ``ord`` column in
    arrival order), placed after ``%(top)s``: the first ``%(room)s`` in batch ``%(open)s``, the rest
    ``%(max_batch)s`` to a batch, in the batches of ``%(new_batches)s`` in turn.

    With ``skip_recorded``, only those the ledger does not hold yet, each once; without, all of them (a
    recorded one fails the statement on the idempotency key: cheaper when none is, the usual case)."""
    cols = ", ".join(columns)
    picked = ", ".join(f"e.{c}" for c in columns)
    fresh = (
        f"""SELECT DISTINCT ON (b.idempotency_key) b.*
              FROM {staging} b
             WHERE NOT EXISTS (SELECT 1 FROM ledger_events o WHERE o.idempotency_key = b.idempotency_key)
             ORDER BY b.idempotency_key, b.ord"""
        if skip_recorded
        else f"SELECT * FROM {staging}"
    )
    # ids drawn in arrival order (once per row: the CTE is materialised), seqs numbered in id order;
    # recorded when this statement starts, under the placing lock, rather than when the transaction began:
    # so the times follow the seqs even when another writer's transaction began first
    return f"""
WITH ided AS MATERIALIZED (
    SELECT nextval(%(sequence)s::regclass) AS event_id, f.*
      FROM ({fresh}) f
     ORDER BY f.ord
), placed AS (
    SELECT i.*, %(top)s::bigint + row_number() OVER (ORDER BY i.event_id) AS seq FROM ided i
)
INSERT INTO ledger_events (event_id, {cols}, seq, merkle_root_id, canonical, recorded_at)
OVERRIDING SYSTEM VALUE
SELECT e.event_id, {picked}, e.seq,
       CASE WHEN e.seq - %(top)s::bigint <= %(room)s::bigint THEN %(open)s::uuid
            ELSE (%(new_batches)s::uuid[])[
                (e.seq - %(top)s::bigint - %(room)s::bigint - 1) / %(max_batch)s::bigint + 1]
       END,
       {canonical_sql("e")},
       statement_timestamp()
  FROM placed e
"""


def new_batch_ids(head: Head, events: int, max_batch: int) -> list[uuid.UUID]:
    """Ids for the batches ``events`` more events open after ``head``'s open batch is full."""
    overflow = max(events - head.room(max_batch), 0)
    return [uuid.uuid4() for _ in range(-(-overflow // max_batch))]


def insert_params(head: Head, events: int, max_batch: int, sequence: str) -> dict[str, object]:
    """The parameters of :func:`insert_sql` for at most ``events`` events placed after ``head``."""
    return {
        "sequence": sequence,
        "top": head.top,
        "room": head.room(max_batch),
        "open": head.open_batch,
        "max_batch": max_batch,
        "new_batches": new_batch_ids(head, events, max_batch),
    }


def identity_sequence(conn: AnyConnection) -> str:
    """The sequence behind ``ledger_events.event_id``."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute("SELECT pg_get_serial_sequence('ledger_events', 'event_id')").fetchone()
    if row is None or row[0] is None:
        raise LookupError("ledger_events.event_id has no identity sequence")
    return str(row[0])
