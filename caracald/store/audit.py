"""The audit log: append with the hash chain, query, verify."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from caracald.core.audit import GENESIS_HASH, AuditEntry, AuditEventType, chain_hash
from caracald.store.database import Connection

#: Serialises appends so that each record chains onto the one committed before it.
AUDIT_CHAIN_LOCK_KEY = 0x0CA7A0D1


@dataclass(frozen=True, slots=True)
class AuditRecord:
    audit_id: int
    entry: AuditEntry
    prev_hash: bytes
    record_hash: bytes


def append(conn: Connection, entry: AuditEntry) -> AuditRecord:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (AUDIT_CHAIN_LOCK_KEY,))
    last = conn.execute("SELECT record_hash FROM audit_log ORDER BY audit_id DESC LIMIT 1").fetchone()
    prev = bytes(last["record_hash"]) if last else GENESIS_HASH
    digest = chain_hash(prev, entry)
    row = conn.execute(
        """
        INSERT INTO audit_log (occurred_at, actor, event_type, action, subject_id, agent_id, reason,
                               details, prev_hash, record_hash)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING audit_id
        """,
        (
            entry.occurred_at,
            entry.actor,
            str(entry.event_type),
            entry.action,
            entry.subject_id,
            entry.agent_id,
            entry.reason,
            Jsonb(entry.details),
            prev,
            digest,
        ),
    ).fetchone()
    assert row is not None
    return AuditRecord(int(row["audit_id"]), entry, prev, digest)


def _record(row: dict[str, Any]) -> AuditRecord:
    entry = AuditEntry(
        occurred_at=row["occurred_at"],
        actor=row["actor"],
        event_type=AuditEventType(row["event_type"]),
        action=row["action"],
        subject_id=row["subject_id"],
        agent_id=str(row["agent_id"]) if row["agent_id"] else None,
        reason=row["reason"],
        details=row["details"],
    )
    return AuditRecord(row["audit_id"], entry, bytes(row["prev_hash"]), bytes(row["record_hash"]))


def query(
    conn: Connection,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    event_types: Sequence[str] = (),
    agent_id: str | None = None,
    limit: int = 1000,
) -> list[AuditRecord]:
    clauses: list[str] = ["TRUE"]
    params: list[Any] = []
    if start is not None:
        clauses.append("occurred_at >= %s")
        params.append(start)
    if end is not None:
        clauses.append("occurred_at <= %s")
        params.append(end)
    if event_types:
        clauses.append("event_type = ANY(%s)")
        params.append(list(event_types))
    if agent_id is not None:
        clauses.append("agent_id = %s")
        params.append(agent_id)
    params.append(limit)
    rows = conn.execute(
        f"SELECT * FROM audit_log WHERE {' AND '.join(clauses)} ORDER BY audit_id LIMIT %s",
        params,
    ).fetchall()
    return [_record(r) for r in rows]


@dataclass(frozen=True, slots=True)
class ChainCheck:
    records: int
    first_bad_id: int | None
    problem: str | None

    @property
    def ok(self) -> bool:
        return self.first_bad_id is None


def verify_chain(conn: Connection, *, batch: int = 5000) -> ChainCheck:
    """Recompute every hash in order; report the first record that does not chain."""
    prev = GENESIS_HASH
    count = 0
    last_id = 0
    while True:
        rows = conn.execute(
            "SELECT * FROM audit_log WHERE audit_id > %s ORDER BY audit_id LIMIT %s", (last_id, batch)
        ).fetchall()
        if not rows:
            return ChainCheck(count, None, None)
        for row in rows:
            record = _record(row)
            if record.prev_hash != prev:
                return ChainCheck(count, record.audit_id, "does not point at the record before it")
            if chain_hash(prev, record.entry) != record.record_hash:
                return ChainCheck(count, record.audit_id, "content does not match its hash")
            prev = record.record_hash
            count += 1
            last_id = record.audit_id
