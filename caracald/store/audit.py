"""The audit log: append with the hash chain, query, verify."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from caracald.core.audit import GENESIS_HASH, AuditEntry, AuditEvent, AuditEventType, chain_hash
from caracald.store.database import Connection

#: Serialises appends so that each record chains onto the one committed before it.
AUDIT_CHAIN_LOCK_KEY = 0x0CA7A0D1


@dataclass(frozen=True, slots=True)
class AuditRecord:
    audit_id: int
    entry: AuditEntry
    prev_hash: bytes
    record_hash: bytes
    #: The audit event's id when the record came from the bus (see :func:`append_events`).
    event_id: uuid.UUID | None = None


def append(conn: Connection, entry: AuditEntry, *, event_id: uuid.UUID | None = None) -> AuditRecord:
    """Chain ``entry`` onto the last record, in the caller's transaction (which holds the chain's lock
    until it ends). ``event_id``, when given, must not be recorded yet (see :func:`append_events`)."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (AUDIT_CHAIN_LOCK_KEY,))
    last = conn.execute("SELECT record_hash FROM audit_log ORDER BY audit_id DESC LIMIT 1").fetchone()
    prev = bytes(last["record_hash"]) if last else GENESIS_HASH
    digest = chain_hash(prev, entry)
    row = conn.execute(
        """
        INSERT INTO audit_log (occurred_at, actor, event_type, action, subject_id, agent_id, reason,
                               details, prev_hash, record_hash, event_id)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING audit_id
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
            event_id,
        ),
    ).fetchone()
    assert row is not None
    return AuditRecord(int(row["audit_id"]), entry, prev, digest, event_id)


def append_events(conn: Connection, events: Sequence[AuditEvent]) -> list[AuditRecord]:
    """Append audit events from the bus in order, each event id at most once; returns the records made.

    Idempotent: an event whose id is already in the log (a redelivery, a replay) is skipped, and so is a
    repeat of an id within ``events``. Runs in the caller's transaction, under the chain's lock.
    """
    if not events:
        return []
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (AUDIT_CHAIN_LOCK_KEY,))
    ids = list(dict.fromkeys(e.event_id for e in events))
    rows = conn.execute("SELECT event_id FROM audit_log WHERE event_id = ANY(%s)", (ids,)).fetchall()
    seen = {r["event_id"] for r in rows}
    fresh = []
    for event in events:
        if event.event_id not in seen:
            seen.add(event.event_id)
            fresh.append(event)
    if not fresh:
        return []
    last = conn.execute("SELECT record_hash FROM audit_log ORDER BY audit_id DESC LIMIT 1").fetchone()
    prev = bytes(last["record_hash"]) if last else GENESIS_HASH
    params = []
    chained = []
    for event in fresh:
        entry = event.entry
        digest = chain_hash(prev, entry)
        params.append(
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
                event.event_id,
            )
        )
        chained.append((event, prev, digest))
        prev = digest
    with conn.cursor() as cur:
        cur.executemany(
            """
            INSERT INTO audit_log (occurred_at, actor, event_type, action, subject_id, agent_id, reason,
                                   details, prev_hash, record_hash, event_id)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING audit_id
            """,
            params,
            returning=True,
        )
        ids_out = []
        while True:
            row = cur.fetchone()
            assert row is not None
            ids_out.append(int(row["audit_id"]))
            if not cur.nextset():
                break
    return [
        AuditRecord(audit_id, event.entry, before, digest, event.event_id)
        for audit_id, (event, before, digest) in zip(ids_out, chained, strict=True)
    ]


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
    return AuditRecord(
        row["audit_id"], entry, bytes(row["prev_hash"]), bytes(row["record_hash"]), row.get("event_id")
    )


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
