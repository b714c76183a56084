"""Sealing: placed or unsealed ledger events into signed, chained Merkle batches.

:func:`seal_pending` is what a ledger writer runs periodically (and what ``caracal merkle seal`` runs).
Each batch is sealed in one transaction under the sealer's advisory lock, so any number of writers may call
it at once: one seals, the others return at once (``busy``), and nothing is sealed twice. A batch the
writers have moved past (a committed event after it is in another batch) is sealed without stopping them; a
batch that may still be filling, and events without a place, are sealed under the placing lock as well
(:mod:`caracald.integrity.placement`), once a writer's transaction ends (the periodic sealer leaves them to
its next round rather than wait). Per batch it

1. finds the next batch: the one the ledger writer placed the next events in (their seq, batch and
   canonical bytes written with them), due when it is full, a later batch has begun, or its oldest event
   was recorded more than ``max_age`` ago; or else, for events inserted without a place, the next
   ``max_batch`` of them, due when so many wait or the oldest is ``max_age`` old, which one ``UPDATE``
   places (in ``event_id`` order, PostgreSQL computing their canonical bytes from the columns,
   :func:`caracald.integrity.encoding.canonical_sql`);
2. reads their canonical bytes in seq order (gap-free after the last batch), hashes their leaves, extends
   the tree kept in ``merkle_state``, and computes the consistency proof from the previous checkpoint;
3. signs the checkpoint (a C2SP signed note: origin, tree size, root, time, batch id);
4. stores the batch (with its starting frontier and its leaf hashes) and the extended tree.

It refuses to seal when ``merkle_state`` disagrees with the last batch, or the key is not the recorded,
unretired one: signing on top of a tampered tree would launder the tampering.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from psycopg.rows import dict_row, tuple_row

from caracald.core import merkle
from caracald.core.errors import ValidationError
from caracald.core.signing import Checkpoint, SigningKey, sign_checkpoint
from caracald.integrity import batches, keys, metrics, placement
from caracald.integrity.batches import AnyConnection, IntegrityError
from caracald.integrity.encoding import EVENT_ID_SLICE, canonical_sql
from caracald.integrity.placement import DEFAULT_MAX_BATCH
from caracald.integrity.proofs import (
    PartialTree,
    block_hashes,
    extend_frontier,
    frontier_root,
)
from caracald.runtime.config import CaracalConfig

DEFAULT_MAX_AGE: Final = timedelta(minutes=5)

#: One sealer at a time (the placing lock, caracald.integrity.placement.SEAL_LOCK_KEY, is taken as well when
#: the batch to seal may still be filling).
SEALER_LOCK_KEY: Final = 0x0CA7B47D

# A placed batch's events in one row, their canonical bytes packed back to back in seq order with their
# lengths (as the verifier reads them): a thousand rows converted one by one cost the sealer more than the
# rest of sealing.
_PLACED_EVENTS = """
SELECT count(*), min(seq), max(seq), min(occurred_at), max(occurred_at),
       string_agg(int4send(octet_length(canonical)), ''::bytea ORDER BY seq),
       string_agg(canonical, ''::bytea ORDER BY seq)
  FROM ledger_events
 WHERE merkle_root_id = %s
"""

# Seal the next unsealed events in event_id order: their seqs follow the tree, and PostgreSQL computes each
# canonical encoding from the columns (encoding.canonical_sql), which comes back to be hashed.
_SEAL_ROWS = f"""
WITH next AS MATERIALIZED (
    SELECT event_id, %(base)s + row_number() OVER (ORDER BY event_id) AS seq
      FROM (SELECT event_id FROM ledger_events WHERE seq IS NULL ORDER BY event_id LIMIT %(limit)s) p
)
UPDATE ledger_events e
   SET seq = next.seq, merkle_root_id = %(batch)s, canonical = {canonical_sql("e", seq="next.seq")}
  FROM next
 WHERE e.event_id = next.event_id  -- unsealed: chosen above, under the lock (and the trigger refuses others)
RETURNING e.seq, e.canonical, e.occurred_at
"""


@dataclass(frozen=True, slots=True)
class SealedBatch:
    batch_id: uuid.UUID
    first_seq: int
    last_seq: int
    tree_size: int
    root_hash: bytes
    key_id: str
    checkpoint: str
    seconds: float
    signing_seconds: float

    @property
    def event_count(self) -> int:
        return self.last_seq - self.first_seq + 1


@dataclass(frozen=True, slots=True)
class SealResult:
    batches: list[SealedBatch] = field(default_factory=list)
    #: Another sealer held the lock: it is sealing; nothing was done here.
    busy: bool = False

    @property
    def events(self) -> int:
        return sum(b.event_count for b in self.batches)


def _check_state(conn: AnyConnection, state: batches.TreeState) -> batches.Batch | None:
    last = batches.latest(conn)
    if last is None:
        if state.tree_size != 0:
            raise IntegrityError(
                f"merkle_state says {state.tree_size} events are sealed but there is no batch"
            )
        return None
    try:
        frontier_root: bytes | None = merkle.TreeBuilder.from_state(state.tree_size, state.frontier).root()
    except ValidationError:
        frontier_root = None
    if (
        state.tree_size != last.tree_size
        or frontier_root != last.root_hash
        or state.last_batch_id != last.batch_id
    ):
        raise IntegrityError(
            f"merkle_state (tree size {state.tree_size}) disagrees with the last batch {last.batch_id} "
            f"(tree size {last.tree_size}): refusing to seal on top of it; run 'caracal merkle verify-range'"
        )
    return last


def _signable_state(conn: AnyConnection, key: SigningKey) -> batches.TreeState:
    """The tree state to extend, locked, once the key and the state are fit to sign on top of."""
    keys.check_signing_key(conn, key)
    state = batches.state(conn, for_update=True)
    _check_state(conn, state)
    return state


def _placed_batch(
    conn: AnyConnection, state: batches.TreeState | None, *, max_batch: int, max_age: timedelta, now: datetime
) -> tuple[uuid.UUID, bool] | None:
    """The first batch the writer placed events in that is not sealed yet, and whether it is due: full, a
    later batch begun, or its oldest event ``max_age`` old. None when no placed event waits."""
    if state is None:
        return None
    with conn.cursor(row_factory=tuple_row) as cur:
        first = cur.execute(
            "SELECT merkle_root_id FROM ledger_events WHERE seq = %s", (state.tree_size + 1,)
        ).fetchone()
        if first is None:
            return None
        batch_id = first[0]
        count, oldest, last = cur.execute(
            "SELECT count(*), min(recorded_at), max(seq) FROM ledger_events WHERE merkle_root_id = %s",
            (batch_id,),
        ).fetchone() or (0, None, None)
        # in seq order: PostgreSQL's generic plan for a bare LIMIT 1 scanned the table from its start
        later = cur.execute(
            "SELECT seq FROM ledger_events WHERE seq > %s ORDER BY seq LIMIT 1", (last,)
        ).fetchone()
    due = count >= max_batch or later is not None or (oldest is not None and oldest <= now - max_age)
    return batch_id, due


def _closed_batch(conn: AnyConnection, state: batches.TreeState | None) -> uuid.UUID | None:
    """The next batch to seal when the writers have moved past it: a committed event after it is in another
    batch. Then every event of it is committed too (placing appends in seq order under the placing lock) and
    no writer adds to it again (they add only to the batch of the highest seq), so it is sealed without that
    lock. One statement, so one snapshot, decides."""
    if state is None:
        return None
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(
            # batches hold runs of seqs, so "an event after it is in another batch" is "the last one is":
            # two index probes, however many events follow
            """
            SELECT f.merkle_root_id
              FROM ledger_events f,
                   LATERAL (SELECT t.merkle_root_id FROM ledger_events t
                             WHERE t.seq IS NOT NULL ORDER BY t.seq DESC LIMIT 1) top
             WHERE f.seq = %(next)s AND top.merkle_root_id IS DISTINCT FROM f.merkle_root_id
            """,
            {"next": state.tree_size + 1},
        ).fetchone()
    return None if row is None else row[0]


def _seal_placed(
    conn: AnyConnection, key: SigningKey, batch_id: uuid.UUID, now: datetime, started: float
) -> SealedBatch:
    state = _signable_state(conn, key)
    with conn.cursor(row_factory=tuple_row, binary=True) as cur:
        packed = cur.execute(_PLACED_EVENTS, (batch_id,)).fetchone()
    assert packed is not None  # an aggregate: one row
    return _close(conn, key, state, batch_id, _Events.packed(batch_id, *packed), now, started)


def _unplaced_due(conn: AnyConnection, *, max_batch: int, max_age: timedelta, now: datetime) -> bool:
    """Whether events without a place wait to be sealed: ``max_batch`` of them, or one ``max_age`` old."""
    with conn.cursor(row_factory=tuple_row) as cur:
        peek = cur.execute(
            "SELECT count(*), min(recorded_at) FROM"
            " (SELECT recorded_at FROM ledger_events WHERE seq IS NULL ORDER BY event_id LIMIT %s) p",
            (max_batch,),
        ).fetchone()
    assert peek is not None
    pending, oldest = int(peek[0]), peek[1]
    return pending > 0 and (pending >= max_batch or oldest <= now - max_age)


def _due(conn: AnyConnection, *, max_batch: int, max_age: timedelta, now: datetime) -> bool:
    """Whether a batch is due: the next placed one or, when none is placed, events without a place."""
    placed = _placed_batch(conn, batches.find_state(conn), max_batch=max_batch, max_age=max_age, now=now)
    if placed is not None:
        return placed[1]
    return _unplaced_due(conn, max_batch=max_batch, max_age=max_age, now=now)


def _seal_one(
    conn: AnyConnection,
    key: SigningKey,
    *,
    max_batch: int,
    max_age: timedelta,
    now: datetime,
    wait: bool,
    wait_for_writers: bool,
) -> SealedBatch | bool | None:
    """Seal at most one batch in the current transaction. False when another sealer holds the lock."""
    started = time.perf_counter()
    with conn.cursor(row_factory=tuple_row) as cur:
        lock = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
        got = cur.execute(f"SELECT {lock}(%s)", (SEALER_LOCK_KEY,)).fetchone()
        if not wait and not (got and got[0]):
            return False
    closed = _closed_batch(conn, batches.find_state(conn))
    if closed is not None:
        return _seal_placed(conn, key, closed, now, started)
    # The next batch may still be filling, or events wait without a place. Nothing due as committed now: done
    # for this round, without waiting for a writer. Else decide again under the placing lock (waiting for a
    # writer's transaction to end, or leaving it to a later round), so that no writer adds to the batch or
    # places events meanwhile.
    if not _due(conn, max_batch=max_batch, max_age=max_age, now=now):
        return None
    if wait_for_writers:
        placement.lock(conn)
    elif not placement.try_lock(conn):
        return None
    placed = _placed_batch(conn, batches.find_state(conn), max_batch=max_batch, max_age=max_age, now=now)
    if placed is not None:
        batch_id, due = placed
        if not due:
            return None
        return _seal_placed(conn, key, batch_id, now, started)
    if not _unplaced_due(conn, max_batch=max_batch, max_age=max_age, now=now):
        return None
    state = _signable_state(conn, key)
    batch_id = uuid.uuid4()
    with conn.cursor(row_factory=tuple_row) as cur:
        # text columns reach the canonical bytes as UTF-8 whatever the session's encoding
        cur.execute("SET LOCAL client_encoding TO 'UTF8'")
        rows = cur.execute(
            _SEAL_ROWS, {"base": state.tree_size, "limit": max_batch, "batch": batch_id}
        ).fetchall()
    if not rows:
        return None
    return _close(conn, key, state, batch_id, _Events.from_rows(rows), now, started)


@dataclass(frozen=True, slots=True)
class _Events:
    """A batch's events as sealing needs them: their seq span, leaf hashes in seq order and time span."""

    first_seq: int
    last_seq: int
    leaves: list[bytes]
    min_time: datetime
    max_time: datetime

    @classmethod
    def packed(
        cls,
        batch_id: uuid.UUID,
        count: int,
        first_seq: int | None,
        last_seq: int | None,
        min_time: datetime | None,
        max_time: datetime | None,
        lengths: bytes | None,
        data: bytes | None,
    ) -> _Events:
        """From :data:`_PLACED_EVENTS`'s row: their bytes packed by PostgreSQL, hashed in one call."""
        hashed = merkle.packed_leaf_hashes(lengths or b"", data or b"", EVENT_ID_SLICE)
        if (
            hashed is None
            or not count
            or first_seq is None
            or last_seq is None
            or min_time is None
            or max_time is None
            or last_seq - first_seq + 1 != count  # seqs are unique: count of them in the span, no gap
        ):
            raise IntegrityError(f"sealing batch {batch_id}: its {count} placed events cannot be read whole")
        hashes = hashed[0]
        leaves = [hashes[i : i + merkle.HASH_SIZE] for i in range(0, len(hashes), merkle.HASH_SIZE)]
        return cls(first_seq, last_seq, leaves, min_time, max_time)

    @classmethod
    def from_rows(cls, rows: list[tuple[Any, ...]]) -> _Events:
        """From (seq, canonical bytes, occurred_at) rows, in any order."""
        rows.sort(key=lambda r: r[0])
        times = [r[2] for r in rows]
        leaves = merkle.leaf_hashes(bytes(r[1]) for r in rows)
        return cls(rows[0][0], rows[-1][0], leaves, min(times), max(times))


def _close(
    conn: AnyConnection,
    key: SigningKey,
    state: batches.TreeState,
    batch_id: uuid.UUID,
    events: _Events,
    now: datetime,
    started: float,
) -> SealedBatch:
    """Seal ``events`` (placed after ``state``'s tree, gap-free) as batch ``batch_id`` on top of ``state``:
    extend the tree with their leaves, sign the checkpoint, store the batch and the tree."""
    base = state.tree_size
    leaves = events.leaves
    if events.first_seq != base + 1 or events.last_seq != base + len(leaves):
        span = f"{events.first_seq}..{events.last_seq}"
        raise IntegrityError(f"sealing batch {batch_id}: seqs {span} after {base}, not gap-free")
    size, frontier = extend_frontier(base, state.frontier, leaves)
    root = frontier_root(size, frontier)
    proof = PartialTree(base, state.frontier, leaves).consistency_path(base, size) if base else []
    blocks = block_hashes(base, leaves)

    signing_started = time.perf_counter()
    note = sign_checkpoint(Checkpoint(state.origin, size, root, now, str(batch_id)), key)
    signing_seconds = time.perf_counter() - signing_started

    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(
            """
            INSERT INTO merkle_batches (batch_id, first_seq, last_seq, event_count, tree_size,
                                        previous_tree_size, root_hash, start_frontier, consistency_proof,
                                        leaf_hashes, block_hashes, checkpoint, key_name, key_id,
                                        min_occurred_at, max_occurred_at, created_at)
            VALUES (%(batch)s, %(first)s, %(last)s, %(count)s, %(last)s, %(previous)s, %(root)s,
                    %(start_frontier)s, %(proof)s, %(leaves)s, %(blocks)s, %(note)s, %(key_name)s,
                    %(key_id)s, %(min_time)s, %(max_time)s, %(now)s)
            """,
            {
                "batch": batch_id,
                "first": base + 1,
                "last": size,
                "count": len(leaves),
                "previous": base,
                "root": root,
                "start_frontier": b"".join(state.frontier),
                "proof": b"".join(proof),
                "leaves": b"".join(leaves),
                "blocks": b"".join(blocks),
                "note": note,
                "key_name": key.name,
                "key_id": key.key_id_hex,
                "min_time": events.min_time,
                "max_time": events.max_time,
                "now": now,
            },
        )
        cur.execute(
            "UPDATE merkle_state SET tree_size = %s, frontier = %s, last_batch_id = %s, updated_at = %s",
            (size, b"".join(frontier), batch_id, now),
        )
    seconds = time.perf_counter() - started
    return SealedBatch(batch_id, base + 1, size, size, root, key.key_id_hex, note, seconds, signing_seconds)


def seal_pending(
    conn: AnyConnection,
    key: SigningKey,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_age: timedelta = DEFAULT_MAX_AGE,
    now: datetime | None = None,
    max_batches: int | None = None,
    wait: bool = False,
    wait_for_writers: bool = True,
) -> SealResult:
    """Seal every batch that is due: full (``max_batch`` events), or holding an event older than ``max_age``.

    ``max_age=timedelta(0)`` seals everything pending now. Each batch commits on its own (a savepoint when
    the caller's transaction is open); ``max_batches`` caps how many one call seals. Returns at once with
    ``busy`` when another sealer holds the lock, unless ``wait``. A batch a writer may still be adding to
    waits for the writer's transaction to end; without ``wait_for_writers`` it is left for a later call
    instead (by then the writer has usually moved past it), so that a writer never waits for a sealing.
    """
    if max_batch < 1:
        raise ValidationError("a batch holds at least one event")
    at = (now or datetime.now(UTC)).astimezone(UTC)
    if at.utcoffset() is None:
        raise ValidationError("now must be timezone-aware")
    sealed: list[SealedBatch] = []
    while max_batches is None or len(sealed) < max_batches:
        with conn.transaction():
            outcome = _seal_one(
                conn,
                key,
                max_batch=max_batch,
                max_age=max_age,
                now=at,
                wait=wait,
                wait_for_writers=wait_for_writers,
            )
        if outcome is False:
            return SealResult(sealed, busy=True)
        if outcome is None or outcome is True:
            break
        sealed.append(outcome)
        metrics.BATCHES_CREATED.inc()
        metrics.BATCH_PROCESSING_DURATION.observe(outcome.seconds)
        metrics.TREE_SIZE.set(outcome.tree_size)
    return SealResult(sealed)


def pending_count(conn: AnyConnection) -> tuple[int, datetime | None]:
    """How many events wait for a batch to be sealed (placed in an open one, or not placed yet), and when
    the first of them was recorded.

    Dashboards ask this on every refresh, and when sealing has stopped it is asked about a backlog that
    grows by the second: the placed events past the last batch are counted from their seqs, which placing
    keeps gap-free (the highest seq less the sealed tree size; a gap is verify-range's to report), and the
    oldest is the first one in seq order, so neither reads the backlog. Events not placed yet (inserted by
    other tools, normally none) are counted, and the oldest of them is the first by event id.
    """
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            """
            WITH s AS (SELECT COALESCE((SELECT tree_size FROM merkle_state), 0) AS sealed)
            SELECT (SELECT count(*) FROM ledger_events WHERE seq IS NULL)
                   + GREATEST(COALESCE((SELECT max(seq) FROM ledger_events), 0) - s.sealed, 0) AS n,
                   LEAST((SELECT recorded_at FROM ledger_events WHERE seq IS NULL ORDER BY event_id LIMIT 1),
                         (SELECT e.recorded_at FROM ledger_events e WHERE e.seq > s.sealed
                           ORDER BY e.seq LIMIT 1)) AS oldest
              FROM s
            """
        ).fetchone()
    assert row is not None
    return int(row["n"]), row["oldest"]


class Sealer:
    """What a ledger writer runs: ``sealer(conn)`` after each committed batch of events, and on a timer
    (so a quiet ledger's last events are sealed once they are ``batch_max_age_seconds`` old).

    Reads the active key from the key folder, and again after a rotation. Cheap when nothing is due (two
    indexed queries); returns at once when another writer is sealing.
    """

    def __init__(
        self, key_dir: Path, *, max_batch: int = DEFAULT_MAX_BATCH, max_age: timedelta = DEFAULT_MAX_AGE
    ) -> None:
        self.key = keys.ActiveSigningKey(key_dir)
        self.max_batch = max_batch
        self.max_age = max_age

    @classmethod
    def from_config(cls, config: CaracalConfig) -> Sealer:
        integrity = config.integrity
        key_dir = integrity.resolved_key_dir(embedded=config.embedded_mode, data_dir=config.embedded.data_dir)
        return cls(
            key_dir,
            max_batch=integrity.batch_size,
            max_age=timedelta(seconds=integrity.batch_max_age_seconds),
        )

    def __call__(
        self, conn: AnyConnection, *, now: datetime | None = None, max_batches: int | None = None
    ) -> SealResult:
        return seal_pending(
            conn,
            self.key.get(),
            max_batch=self.max_batch,
            max_age=self.max_age,
            now=now,
            max_batches=max_batches,
        )
