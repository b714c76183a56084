"""The ``merkle_batches`` and ``merkle_state`` rows, read and written by the sealer, verifier and proofs."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row, tuple_row

from caracald.core.errors import ConflictError
from caracald.core.merkle import HASH_SIZE

AnyConnection = psycopg.Connection[Any]

_COLUMNS = """batch_id, first_seq, last_seq, event_count, tree_size, previous_tree_size, root_hash,
    start_frontier, consistency_proof, block_hashes, checkpoint, key_name, key_id, min_occurred_at,
    max_occurred_at, created_at, verified_at, verification_status, verification_problem"""


def split_hashes(data: bytes | memoryview | None) -> list[bytes]:
    """32-byte hashes stored back to back."""
    if not data:
        return []
    raw = bytes(data)
    return [raw[i : i + HASH_SIZE] for i in range(0, len(raw), HASH_SIZE)]


@dataclass(frozen=True, slots=True)
class Batch:
    batch_id: UUID
    first_seq: int
    last_seq: int
    event_count: int
    tree_size: int
    previous_tree_size: int
    root_hash: bytes
    start_frontier: tuple[bytes, ...]
    consistency_proof: tuple[bytes, ...]
    #: Roots of the aligned 32-leaf blocks lying wholly in the batch (see proofs.SparseTree).
    block_hashes: tuple[bytes, ...]
    checkpoint: str
    key_name: str
    key_id: str
    min_occurred_at: datetime
    max_occurred_at: datetime
    created_at: datetime
    verified_at: datetime | None = None
    verification_status: str | None = None
    verification_problem: str | None = None
    #: Only when asked for (``with_leaves``): the batch's leaf hashes, 32 bytes each, in seq order.
    leaf_hashes: bytes | None = None

    @property
    def seqs(self) -> range:
        return range(self.first_seq, self.last_seq + 1)


def _batch(row: dict[str, Any]) -> Batch:
    leaves = row.get("leaf_hashes")
    return Batch(
        batch_id=row["batch_id"],
        first_seq=int(row["first_seq"]),
        last_seq=int(row["last_seq"]),
        event_count=int(row["event_count"]),
        tree_size=int(row["tree_size"]),
        previous_tree_size=int(row["previous_tree_size"]),
        root_hash=bytes(row["root_hash"]),
        start_frontier=tuple(split_hashes(row["start_frontier"])),
        consistency_proof=tuple(split_hashes(row["consistency_proof"])),
        block_hashes=tuple(split_hashes(row["block_hashes"])),
        checkpoint=row["checkpoint"],
        key_name=row["key_name"],
        key_id=row["key_id"],
        min_occurred_at=row["min_occurred_at"],
        max_occurred_at=row["max_occurred_at"],
        created_at=row["created_at"],
        verified_at=row["verified_at"],
        verification_status=row["verification_status"],
        verification_problem=row["verification_problem"],
        leaf_hashes=bytes(leaves) if leaves is not None else None,
    )


def _select(
    conn: AnyConnection, where: str, params: Sequence[Any] | dict[str, Any], *, leaves: bool
) -> list[Batch]:
    columns = _COLUMNS + (", leaf_hashes" if leaves else "")
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(f"SELECT {columns} FROM merkle_batches WHERE {where}", params).fetchall()
    return [_batch(r) for r in rows]


def get(conn: AnyConnection, batch_id: UUID, *, with_leaves: bool = False) -> Batch | None:
    found = _select(conn, "batch_id = %s", (batch_id,), leaves=with_leaves)
    return found[0] if found else None


def stored_leaves(conn: AnyConnection, batch: Batch) -> bytes | None:
    """The leaf hashes stored in the row of ``batch`` (by its id and tree size), as they are."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(
            "SELECT leaf_hashes FROM merkle_batches WHERE batch_id = %s AND tree_size = %s LIMIT 1",
            (batch.batch_id, batch.tree_size),
        ).fetchone()
    return bytes(row[0]) if row is not None and row[0] is not None else None


@dataclass(frozen=True, slots=True)
class EventBatch:
    """What proving one event needs from its batch: the batch (with its block roots), the batch before it,
    the ledger's origin, and the leaves of the event's block and of the partial blocks at the batch's ends
    (keyed by leaf index)."""

    batch: Batch
    before: Batch | None
    #: None when merkle_state has no row (the verifier reports it).
    origin: str | None
    leaves: dict[int, bytes]


_BLOCK = 32
_SLICE = (
    "substring(b.leaf_hashes FROM ((({lo}) - (b.first_seq - 1)) * 32 + 1)::int"
    " FOR ((({hi}) - ({lo})) * 32)::int)"
)
_HEAD = ("b.first_seq - 1", "least(((b.first_seq - 1 + 31) / 32) * 32, b.last_seq)")
_EVENT = ("greatest(({index} / 32) * 32, b.first_seq - 1)", "least(({index} / 32) * 32 + 32, b.last_seq)")
_TAIL = ("greatest((b.last_seq / 32) * 32, b.first_seq - 1)", "b.last_seq")
_B_COLUMNS = ", ".join(f"b.{c.strip()}" for c in _COLUMNS.split(","))


def _slice_sql(bounds: tuple[str, str], index: str) -> str:
    lo, hi = (bound.format(index=index) for bound in bounds)
    return f"CASE WHEN ({hi}) > ({lo}) THEN {_SLICE.format(lo=lo, hi=hi)} ELSE '\\x'::bytea END"


_P_COLUMNS = ", ".join(f"p.{c.strip()} AS p_{c.strip()}" for c in _COLUMNS.split(","))
_COLUMN_NAMES = tuple(c.strip() for c in _COLUMNS.split(","))


def _event_batch(row: dict[str, Any], index: int) -> EventBatch:
    batch = _batch(row)
    before = (
        _batch({name: row[f"p_{name}"] for name in _COLUMN_NAMES}) if row["p_batch_id"] is not None else None
    )
    start, end = batch.first_seq - 1, batch.last_seq
    block = (index // _BLOCK) * _BLOCK
    leaves: dict[int, bytes] = {}
    for lo, data in (
        (start, row["head"]),
        (max(block, start), row["event"]),
        (max((end // _BLOCK) * _BLOCK, start), row["tail"]),
    ):
        for i, leaf in enumerate(split_hashes(data)):
            leaves[lo + i] = leaf
    return EventBatch(batch, before, row["origin"], leaves)


@functools.lru_cache(maxsize=8)
def _with_event_sql(columns: str) -> str:
    index = "(e.seq - 1)"
    return f"""
        SELECT e.seq AS event_seq, e.merkle_root_id AS event_batch, {columns},
               (SELECT origin FROM merkle_state) AS origin,
               {_B_COLUMNS}, {_P_COLUMNS},
               {_slice_sql(_HEAD, index)} AS head,
               {_slice_sql(_EVENT, index)} AS event,
               {_slice_sql(_TAIL, index)} AS tail
          FROM ledger_events e
          LEFT JOIN merkle_batches b ON b.batch_id = e.merkle_root_id AND e.seq IS NOT NULL
          LEFT JOIN merkle_batches p ON p.tree_size = b.previous_tree_size
         WHERE e.event_id = %(event)s
    """


def with_event(
    conn: AnyConnection, event_id: int, columns: str
) -> tuple[dict[str, Any], EventBatch | None] | None:
    """One round trip for proving an event: ``columns`` (SQL over ``ledger_events e``, each named with
    ``AS``) of event ``event_id``, and the batch it names with what the audit path of the event's leaf
    needs (a few KB), or None for the batch when it names none that exists. None when there is no such
    event."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(_with_event_sql(columns), {"event": event_id}).fetchall()
    if not rows:
        return None
    event = rows[0]
    if event["batch_id"] is None:
        return event, None
    return event, _event_batch(event, int(event["event_seq"]) - 1)


def ending_at(conn: AnyConnection, tree_size: int, *, with_leaves: bool = False) -> Batch | None:
    """The batch whose checkpoint covers exactly ``tree_size`` events."""
    found = _select(conn, "tree_size = %s", (tree_size,), leaves=with_leaves)
    return found[0] if found else None


def containing(conn: AnyConnection, seq: int, *, with_leaves: bool = False) -> Batch | None:
    found = _select(
        conn,
        "first_seq = (SELECT max(first_seq) FROM merkle_batches WHERE first_seq <= %s) AND last_seq >= %s",
        (seq, seq),
        leaves=with_leaves,
    )
    return found[0] if found else None


def latest(conn: AnyConnection) -> Batch | None:
    found = _select(conn, "tree_size = (SELECT max(tree_size) FROM merkle_batches)", (), leaves=False)
    return found[0] if found else None


def in_time_range(conn: AnyConnection, start: datetime, end: datetime) -> list[Batch]:
    """Batches holding an event that occurred in ``[start, end]`` by their recorded span, in tree size
    order (the signed one)."""
    return _select(
        conn,
        "min_occurred_at <= %s AND max_occurred_at >= %s ORDER BY tree_size",
        (end, start),
        leaves=False,
    )


def covering(conn: AnyConnection, lo: int, hi: int) -> list[Batch]:
    """The batches that, by their tree sizes (which their checkpoints sign), hold seqs ``lo..hi``: from
    the first whose tree size reaches ``lo`` to the first whose tree size reaches ``hi`` (or the last), in
    tree size order. Whether they chain, without a gap, is for the verifier to check."""
    return _select(
        conn,
        "tree_size >= %(lo)s AND tree_size <= coalesce("
        " (SELECT min(tree_size) FROM merkle_batches WHERE tree_size >= %(hi)s), 9223372036854775807)"
        " ORDER BY tree_size",
        {"lo": lo, "hi": hi},
        leaves=False,
    )


def after(conn: AnyConnection, tree_size: int) -> Batch | None:
    """The batch with the smallest tree size above ``tree_size`` (the one that should follow it)."""
    found = _select(conn, "tree_size > %s ORDER BY tree_size LIMIT 1", (tree_size,), leaves=False)
    return found[0] if found else None


def recent(conn: AnyConnection, limit: int) -> list[Batch]:
    rows = _select(conn, "TRUE ORDER BY first_seq DESC LIMIT %s", (limit,), leaves=False)
    return rows[::-1]


def count(conn: AnyConnection) -> int:
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute("SELECT count(*) FROM merkle_batches").fetchone()
    return int(row[0]) if row else 0


def leaves_between(conn: AnyConnection, after_size: int, up_to_size: int) -> list[bytes]:
    """The stored leaf hashes of seq ``after_size + 1 .. up_to_size`` (whole batches), in order."""
    if up_to_size <= after_size:
        return []
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(
            "SELECT first_seq, last_seq, leaf_hashes FROM merkle_batches"
            " WHERE first_seq > %s AND last_seq <= %s ORDER BY first_seq",
            (after_size, up_to_size),
        ).fetchall()
    leaves: list[bytes] = []
    expected = after_size + 1
    for first, last, blob in rows:
        if first != expected:
            raise LookupError(f"no batch starts at seq {expected}")
        leaves.extend(split_hashes(blob))
        expected = last + 1
    if expected != up_to_size + 1:
        raise LookupError(f"no batch ends at seq {up_to_size}")
    return leaves


def record_verification(
    conn: AnyConnection, outcomes: Iterable[tuple[UUID, bool, str | None]], at: datetime
) -> None:
    """Note each batch's latest verification outcome (for ``list-batches`` and dashboards)."""
    rows = list(outcomes)
    if not rows:
        return
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(
            """
            UPDATE merkle_batches b
               SET verified_at = %s, verification_status = v.status, verification_problem = v.problem
              FROM unnest(%s::uuid[], %s::text[], %s::text[]) AS v(batch_id, status, problem)
             WHERE b.batch_id = v.batch_id
            """,
            (
                at,
                [r[0] for r in rows],
                ["passed" if r[1] else "failed" for r in rows],
                [r[2] for r in rows],
            ),
        )


class IntegrityError(ConflictError):
    """What is stored contradicts itself or its signatures: the ledger needs verifying."""

    reason = "integrity_failure"


@dataclass(frozen=True, slots=True)
class TreeState:
    origin: str
    tree_size: int
    frontier: tuple[bytes, ...]
    last_batch_id: UUID | None
    updated_at: datetime


def state(conn: AnyConnection, *, for_update: bool = False) -> TreeState:
    found = find_state(conn, for_update=for_update)
    if found is None:
        raise IntegrityError(
            "merkle_state has no row: the tree state was deleted or the ledger integrity migration did not "
            "run; run 'caracal merkle verify-range'"
        )
    return found


def find_state(conn: AnyConnection, *, for_update: bool = False) -> TreeState | None:
    """The tree state, or None when its row is missing (deleted: the verifier reports it)."""
    lock = " FOR UPDATE" if for_update else ""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            f"SELECT origin, tree_size, frontier, last_batch_id, updated_at FROM merkle_state{lock}"
        ).fetchone()
    if row is None:
        return None
    return TreeState(
        origin=row["origin"],
        tree_size=int(row["tree_size"]),
        frontier=tuple(split_hashes(row["frontier"])),
        last_batch_id=row["last_batch_id"],
        updated_at=row["updated_at"],
    )


@dataclass(frozen=True, slots=True)
class TreeHead:
    """The newest checkpoint: what a snapshot or a dashboard shows as the ledger's Merkle root."""

    tree_size: int
    root_hash: bytes
    batch_id: UUID
    checkpoint: str
    created_at: datetime


def tree_head(conn: AnyConnection) -> TreeHead | None:
    """The newest batch's checkpoint (None before anything is sealed). Not verified: see the verifier."""
    last = latest(conn)
    if last is None:
        return None
    return TreeHead(last.tree_size, last.root_hash, last.batch_id, last.checkpoint, last.created_at)
