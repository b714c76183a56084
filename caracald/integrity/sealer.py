"""Sealing: unsealed ledger events into signed, chained Merkle batches.

:func:`seal_pending` is what a ledger writer calls after committing events (and what ``caracal merkle
seal`` runs). Each batch is sealed in one transaction under a transaction-scoped advisory lock, so any
number of writers may call it at once: one seals, the others return at once (``busy``), and nothing is
sealed twice. Per batch it

1. closes a batch only when ``max_batch`` events wait, or the oldest waiting one was recorded more than
   ``max_age`` ago;
2. in one ``UPDATE``, gives the next unsealed events (in ``event_id`` order) the next seqs -- gap-free across
   batches -- the batch id, and their canonical bytes, which PostgreSQL computes from the columns
   (:func:`caracald.integrity.encoding.canonical_sql`) and returns to be hashed;
3. extends the tree kept in ``merkle_state`` by their leaf hashes, and computes the consistency proof
   from the previous checkpoint;
4. signs the checkpoint (a C2SP signed note: origin, tree size, root, time, batch id);
5. stores the batch (with its starting frontier and its leaf hashes) and the extended tree.

It refuses to seal when ``merkle_state`` disagrees with the last batch, or the key is not the recorded,
unretired one: signing on top of a tampered tree would launder the tampering.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from psycopg.rows import dict_row, tuple_row

from caracald.core import merkle
from caracald.core.errors import ValidationError
from caracald.core.signing import Checkpoint, SigningKey, sign_checkpoint
from caracald.integrity import batches, keys, metrics
from caracald.integrity.batches import AnyConnection
from caracald.integrity.encoding import canonical_sql
from caracald.integrity.proofs import (
    IntegrityError,
    PartialTree,
    block_hashes,
    extend_frontier,
    frontier_root,
)
from caracald.runtime.config import CaracalConfig

#: Serialises sealers (the event log uses 0x0CA7E100, migrations 0x0CA7AC41, the audit chain 0x0CA7A0D1).
SEAL_LOCK_KEY: Final = 0x0CA7B47C

DEFAULT_MAX_BATCH: Final = 1000
DEFAULT_MAX_AGE: Final = timedelta(minutes=5)

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


def _seal_one(
    conn: AnyConnection, key: SigningKey, *, max_batch: int, max_age: timedelta, now: datetime, wait: bool
) -> SealedBatch | bool | None:
    """Seal at most one batch in the current transaction. False when another sealer holds the lock."""
    started = time.perf_counter()
    with conn.cursor(row_factory=tuple_row) as cur:
        lock = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
        got = cur.execute(f"SELECT {lock}(%s)", (SEAL_LOCK_KEY,)).fetchone()
        if not wait and not (got and got[0]):
            return False
        peek = cur.execute(
            "SELECT count(*), min(recorded_at) FROM"
            " (SELECT recorded_at FROM ledger_events WHERE seq IS NULL ORDER BY event_id LIMIT %s) p",
            (max_batch,),
        ).fetchone()
    assert peek is not None
    pending, oldest = int(peek[0]), peek[1]
    if pending == 0 or (pending < max_batch and oldest > now - max_age):
        return None
    keys.check_signing_key(conn, key)
    state = batches.state(conn, for_update=True)
    _check_state(conn, state)

    base = state.tree_size
    batch_id = uuid.uuid4()
    with conn.cursor(row_factory=tuple_row) as cur:
        # text columns reach the canonical bytes as UTF-8 whatever the session's encoding
        cur.execute("SET LOCAL client_encoding TO 'UTF8'")
        rows = cur.execute(_SEAL_ROWS, {"base": base, "limit": max_batch, "batch": batch_id}).fetchall()
    if not rows:
        return None
    rows.sort(key=lambda r: r[0])
    if rows[0][0] != base + 1 or rows[-1][0] != base + len(rows):
        raise IntegrityError(f"sealing batch {batch_id}: seqs {rows[0][0]}..{rows[-1][0]} after {base}")
    canonicals = [bytes(r[1]) for r in rows]
    times = [r[2] for r in rows]
    leaves = merkle.leaf_hashes(canonicals)
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
                "count": len(canonicals),
                "previous": base,
                "root": root,
                "start_frontier": b"".join(state.frontier),
                "proof": b"".join(proof),
                "leaves": b"".join(leaves),
                "blocks": b"".join(blocks),
                "note": note,
                "key_name": key.name,
                "key_id": key.key_id_hex,
                "min_time": min(times),
                "max_time": max(times),
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
) -> SealResult:
    """Seal every batch that is due: full (``max_batch`` events), or holding an event older than ``max_age``.

    ``max_age=timedelta(0)`` seals everything pending now. Each batch commits on its own (a savepoint when
    the caller's transaction is open); ``max_batches`` caps how many one call seals. Returns at once with
    ``busy`` when another sealer holds the lock, unless ``wait``.
    """
    if max_batch < 1:
        raise ValidationError("a batch holds at least one event")
    at = (now or datetime.now(UTC)).astimezone(UTC)
    if at.utcoffset() is None:
        raise ValidationError("now must be timezone-aware")
    sealed: list[SealedBatch] = []
    while max_batches is None or len(sealed) < max_batches:
        with conn.transaction():
            outcome = _seal_one(conn, key, max_batch=max_batch, max_age=max_age, now=at, wait=wait)
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
    """How many events wait for a batch, and when the oldest of them was recorded."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "SELECT count(*) AS n, min(recorded_at) AS oldest FROM ledger_events WHERE seq IS NULL"
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
