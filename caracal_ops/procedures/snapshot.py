"""Ledger snapshots: a point-in-time record of the ledger's totals, to check and rebuild from.

A snapshot holds, per agent, currency and UTC day, the charged spend (settlements, expiries, adjustments) and
the number of events of every type, up to the last event id it saw, plus the latest signed Merkle
checkpoint at that moment (null before the first batch), and the reference data the ledger's events need:
agents, their credential digests, policies and their versions, allowlists, prices and the public halves of
the signing keys (``merkle_keys``). It is stored in ``ledger_snapshots`` as canonical JSON with its SHA-256,
and copied to ``<backup dir>/snapshots/<id>.json`` so that it survives a ``caracal db reset``.

``snapshot restore`` checks the snapshot's checksum. On a database that holds none of the reference data
(after ``caracal db reset``) it puts the snapshot's back, so that a replay from the bus can write the events
again (an event of an unknown agent is a dead letter) and the ledger writer can seal with its key. It compares
the ledger up to the snapshot's last event with its totals (every difference is reported, and any difference
stops the restore), then rebuilds the derived state: the hourly and daily spend totals from the ledger and,
with the Redis budget backend, the shared budget counters (:func:`caracald.admin.budget.ledger_totals` and
``RedisBudget.rebuild``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from caracal_ops.procedures.framework import Plan, StepContext, StepFailed, utcnow
from caracald.core.errors import NotFoundError, ValidationError
from caracald.core.ledger import CHARGED_EVENT_TYPES
from caracald.runtime.config import CaracalConfig
from caracald.store.database import Connection, Database

FORMAT_VERSION = 2
#: Format 1 had no reference data; it is still read.
READABLE_FORMATS = frozenset({1, FORMAT_VERSION})

#: The reference data a snapshot holds, in the order it is put back (parents before children). Each table is
#: kept as a JSON array of rows, ordered by the columns named, with every number as a string so that amounts
#: stay exact.
REFERENCE_TABLES: tuple[tuple[str, str], ...] = (
    ("agents", "agent_id"),
    ("agent_credentials", "credential_id"),
    ("policies", "policy_id"),
    ("policy_versions", "policy_id, version"),
    ("allowlists", "allowlist_id"),
    ("price_entries", "price_id"),
    ("merkle_keys", "key_name, key_id"),
)


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    snapshot_id: uuid.UUID
    created_at: datetime
    created_by: str
    last_event_id: int
    total_events: int
    merkle_root: str | None
    tree_size: int | None
    sha256: str
    size_bytes: int
    document: str

    @property
    def data(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.document)
        return loaded


def canonical(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def snapshot_dir(config: CaracalConfig) -> Path:
    return config.backup.resolved_dir(embedded=config.embedded_mode, data_dir=config.embedded.data_dir) / (
        "snapshots"
    )


# -- reading the ledger -----------------------------------------------------------------------------------


def ledger_totals(conn: Connection, last_event_id: int) -> list[dict[str, Any]]:
    """Per agent, currency and UTC day up to ``last_event_id``: charged spend and number of events."""
    rows = conn.execute(
        """
        SELECT agent_id, currency, to_char(date_trunc('day', occurred_at, 'UTC'), 'YYYY-MM-DD') AS day,
               COALESCE(sum(cost) FILTER (WHERE event_type = ANY(%(charged)s)), 0) AS charged,
               count(*) AS events
          FROM ledger_events
         WHERE event_id <= %(last)s
         GROUP BY 1, 2, 3
         ORDER BY 1, 2, 3
        """,
        {"last": last_event_id, "charged": [str(t) for t in CHARGED_EVENT_TYPES]},
    ).fetchall()
    return [
        {
            "agent_id": str(r["agent_id"]),
            "currency": r["currency"].strip(),
            "day": r["day"],
            "charged": _decimal_text(Decimal(r["charged"])),
            "events": int(r["events"]),
        }
        for r in rows
    ]


def _decimal_text(value: Decimal) -> str:
    """A decimal without trailing zeros (``12.500000000000`` -> ``12.5``), so equal amounts compare equal."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text


def _latest_checkpoint(conn: Connection) -> dict[str, Any] | None:
    try:
        from caracald.integrity import batches
    except ImportError:  # pragma: no cover - integrity not installed
        return None
    batch = batches.latest(conn)
    if batch is None:
        return None
    return {
        "batch_id": str(batch.batch_id),
        "root": "0x" + batch.root_hash.hex(),
        "tree_size": batch.tree_size,
        "key_name": batch.key_name,
        "key_id": batch.key_id,
        "checkpoint": batch.checkpoint,
        "created_at": batch.created_at.isoformat().replace("+00:00", "Z"),
    }


def reference_data(conn: Connection) -> dict[str, list[dict[str, Any]]]:
    """Every row of the reference tables, as JSON objects whose numbers are strings (exact amounts)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for table, order in REFERENCE_TABLES:
        row = conn.execute(
            f"""
            SELECT COALESCE(jsonb_agg(
                       (SELECT jsonb_object_agg(key, CASE jsonb_typeof(value)
                                                     WHEN 'number' THEN to_jsonb(value #>> '{{}}')
                                                     ELSE value END)
                          FROM jsonb_each(to_jsonb(t)))
                       ORDER BY {order}), '[]'::jsonb) AS data
              FROM {table} t
            """
        ).fetchone()
        out[table] = list(row["data"]) if row else []
    return out


def reference_counts(conn: Connection) -> dict[str, int]:
    """How many rows each reference table holds now."""
    counts: dict[str, int] = {}
    for table, _ in REFERENCE_TABLES:
        row = conn.execute(f"SELECT count(*) AS n FROM {table}").fetchone()
        counts[table] = int(row["n"]) if row else 0
    return counts


def put_back_reference(conn: Connection, reference: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    """Insert the snapshot's reference rows (into empty tables), each table in one statement."""
    written: dict[str, int] = {}
    for table, _ in REFERENCE_TABLES:
        rows = reference.get(table) or []
        if not rows:
            written[table] = 0
            continue
        cur = conn.execute(
            f"INSERT INTO {table} SELECT * FROM jsonb_populate_recordset(NULL::{table}, %s::jsonb)",
            (json.dumps(rows),),
        )
        written[table] = cur.rowcount
    return written


# -- create -----------------------------------------------------------------------------------------------


def create_snapshot(db: Database, *, actor: str, directory: Path | None = None) -> SnapshotInfo:
    """Take a snapshot in one REPEATABLE READ transaction and store it (and a copy in ``directory``)."""
    snapshot_id = uuid.uuid4()
    created_at = utcnow()
    with db.transaction() as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        row = conn.execute("SELECT COALESCE(max(event_id), 0) AS last FROM ledger_events").fetchone()
        last_event_id = int(row["last"]) if row else 0
        totals = ledger_totals(conn, last_event_id)
        merkle = _latest_checkpoint(conn)
        reference = reference_data(conn)
        total_events = sum(t["events"] for t in totals)
        data = {
            "format": FORMAT_VERSION,
            "snapshot_id": str(snapshot_id),
            "created_at": created_at.isoformat().replace("+00:00", "Z"),
            "created_by": actor,
            "last_event_id": last_event_id,
            "total_events": total_events,
            "merkle": merkle,
            "totals": totals,
            "reference": reference,
        }
        document = canonical(data)
        digest = sha256_text(document)
        info = SnapshotInfo(
            snapshot_id=snapshot_id,
            created_at=created_at,
            created_by=actor,
            last_event_id=last_event_id,
            total_events=total_events,
            merkle_root=merkle["root"] if merkle else None,
            tree_size=merkle["tree_size"] if merkle else None,
            sha256=digest,
            size_bytes=len(document.encode()),
            document=document,
        )
        _insert(conn, info)
    if directory is not None:
        write_copy(directory, info)
    return info


def _insert(conn: Connection, info: SnapshotInfo) -> None:
    conn.execute(
        """
        INSERT INTO ledger_snapshots (snapshot_id, created_at, created_by, last_event_id, total_events,
                                      merkle_root, tree_size, document, sha256, size_bytes)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (snapshot_id) DO NOTHING
        """,
        (
            info.snapshot_id,
            info.created_at,
            info.created_by,
            info.last_event_id,
            info.total_events,
            info.merkle_root,
            info.tree_size,
            info.document,
            info.sha256,
            info.size_bytes,
        ),
    )


def write_copy(directory: Path, info: SnapshotInfo) -> Path:
    """``<directory>/<id>.json`` (the document) and ``<id>.json.sha256``, written atomically, mode 0600."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"{info.snapshot_id}.json"
    for target, text in ((path, info.document), (path.with_suffix(".json.sha256"), info.sha256 + "\n")):
        tmp = target.with_name(target.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(target)
    return path


# -- list and find ----------------------------------------------------------------------------------------

_COLUMNS = (
    "snapshot_id, created_at, created_by, last_event_id, total_events, merkle_root, tree_size, sha256, "
    "size_bytes, document"
)


def _info(row: dict[str, Any]) -> SnapshotInfo:
    return SnapshotInfo(
        snapshot_id=row["snapshot_id"],
        created_at=row["created_at"],
        created_by=row["created_by"],
        last_event_id=int(row["last_event_id"]),
        total_events=int(row["total_events"]),
        merkle_root=row["merkle_root"],
        tree_size=row["tree_size"],
        sha256=row["sha256"],
        size_bytes=int(row["size_bytes"]),
        document=row["document"],
    )


def list_snapshots(db: Database, limit: int = 100) -> list[SnapshotInfo]:
    with db.read() as conn:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM ledger_snapshots ORDER BY created_at DESC, snapshot_id LIMIT %s",
            (limit,),
        ).fetchall()
    return [_info(r) for r in rows]


def parse_snapshot_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text.strip())
    except ValueError:
        raise ValidationError(f"not a snapshot id: {text!r} (see caracal snapshot list)") from None


def _from_file(directory: Path, snapshot_id: uuid.UUID) -> SnapshotInfo | None:
    path = directory / f"{snapshot_id}.json"
    try:
        document = path.read_text()
        recorded = path.with_suffix(".json.sha256").read_text().strip()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(document)
        created = datetime.fromisoformat(str(data["created_at"]).replace("Z", "+00:00"))
        merkle = data.get("merkle") or None
        return SnapshotInfo(
            snapshot_id=snapshot_id,
            created_at=created,
            created_by=str(data.get("created_by", "")),
            last_event_id=int(data["last_event_id"]),
            total_events=int(data["total_events"]),
            merkle_root=merkle["root"] if merkle else None,
            tree_size=merkle["tree_size"] if merkle else None,
            sha256=recorded,
            size_bytes=len(document.encode()),
            document=document,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ValidationError(f"snapshot file {path} is unreadable: {exc}") from None


def find_snapshot(
    db: Database, snapshot_id: uuid.UUID, directory: Path | None = None
) -> tuple[SnapshotInfo, str]:
    """The snapshot and where it came from (``database`` or the file's path)."""
    with db.read() as conn:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM ledger_snapshots WHERE snapshot_id = %s", (snapshot_id,)
        ).fetchone()
    if row is not None:
        return _info(row), "database"
    if directory is not None:
        found = _from_file(directory, snapshot_id)
        if found is not None:
            return found, str(directory / f"{snapshot_id}.json")
    raise NotFoundError(f"snapshot {snapshot_id} not found (see caracal snapshot list)")


# -- compare and restore ------------------------------------------------------------------------------------


def check_document(info: SnapshotInfo) -> dict[str, Any]:
    """The snapshot's data, once its SHA-256 matches; raises StepFailed otherwise."""
    actual = sha256_text(info.document)
    if actual != info.sha256:
        raise StepFailed(
            f"snapshot {info.snapshot_id} is damaged: its SHA-256 is {actual}, {info.sha256} was recorded",
            state="nothing was changed",
        )
    data = json.loads(info.document)
    if data.get("format") not in READABLE_FORMATS or data.get("snapshot_id") != str(info.snapshot_id):
        raise StepFailed(f"snapshot {info.snapshot_id}: unexpected format or id", state="nothing was changed")
    return dict(data)


def differences(expected: list[dict[str, Any]], actual: list[dict[str, Any]]) -> list[str]:
    """Readable differences between two lists of totals (per agent, currency, day)."""

    def keyed(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], tuple[str, int]]:
        return {(r["agent_id"], r["currency"], r["day"]): (r["charged"], int(r["events"])) for r in rows}

    want, have = keyed(expected), keyed(actual)
    out = []
    for key in sorted(set(want) | set(have)):
        agent, currency, day = key
        where = f"agent {agent} {currency} {day}"
        if key not in have:
            out.append(
                f"{where}: in the snapshot ({want[key][0]} charged, {want[key][1]} events), not in the ledger"
            )
        elif key not in want:
            out.append(
                f"{where}: in the ledger ({have[key][0]} charged, {have[key][1]} events), not in the snapshot"
            )
        elif want[key] != have[key]:
            out.append(
                f"{where}: snapshot {want[key][0]} charged in {want[key][1]} events, "
                f"ledger {have[key][0]} charged in {have[key][1]} events"
            )
    return out


def compare(db: Database, info: SnapshotInfo) -> list[str]:
    data = check_document(info)
    with db.read() as conn:
        actual = ledger_totals(conn, int(data["last_event_id"]))
    return differences(list(data["totals"]), actual)


@dataclass(frozen=True)
class SnapshotEnv:
    config: CaracalConfig
    db: Callable[[], Database]
    redis_url: Callable[[], str]


def plan_restore(env: SnapshotEnv, snapshot_id: str) -> Plan:
    wanted = parse_snapshot_id(snapshot_id)
    directory = snapshot_dir(env.config)
    info, source = find_snapshot(env.db(), wanted, directory)
    redis = env.config.budget.backend == "redis"
    plan = Plan(
        "snapshot.restore",
        f"Restore the ledger's totals from snapshot {wanted}",
        params={"snapshot_id": wanted, "source": source, "last_event_id": info.last_event_id},
        confirm_word="restore",
    )
    plan.note(
        f"snapshot of {info.created_at.isoformat()} up to event {info.last_event_id} "
        f"({info.total_events} events), read from {source}"
    )

    def verify(step: StepContext) -> str:
        check_document(info)
        if source != "database":
            with env.db().transaction() as conn:
                _insert(conn, info)
        return f"SHA-256 {info.sha256} matches"

    reference: dict[str, list[dict[str, Any]]] = dict(info.data.get("reference") or {})
    with env.db().read() as conn:
        present = reference_counts(conn)
    held = {t: len(rows) for t, rows in reference.items() if rows}
    put_back = bool(held) and not any(present.values())
    if not reference:
        plan.note(
            "this snapshot holds no reference data (agents, policies, keys): it was taken by an older version"
        )
    elif put_back:
        plan.note(
            "the database holds no agents, policies, prices or signing keys (a reset database): "
            "the snapshot's are put back first"
        )
    elif held:
        plan.note("the database already holds reference data: it is left as it is")

    def reference_step(step: StepContext) -> str:
        with env.db().transaction() as conn:
            if any(reference_counts(conn).values()):
                raise StepFailed(
                    "reference data appeared in the database since the plan was made",
                    state="nothing was changed",
                )
            written = put_back_reference(conn, reference)
        step.result["reference"] = written
        return "put back " + ", ".join(f"{n} {table}" for table, n in written.items() if n)

    def compare_step(step: StepContext) -> str:
        found = compare(env.db(), info)
        step.result["differences"] = found
        if found:
            with env.db().read() as conn:
                row = conn.execute(
                    "SELECT count(*) AS n FROM ledger_events WHERE event_id <= %s", (info.last_event_id,)
                ).fetchone()
            if row is not None and int(row["n"]) == 0:
                step.warn(
                    "the ledger holds no event up to the snapshot's last one: replay the events "
                    "(caracal replay start) to restore them; they must add up to the snapshot's totals"
                )
                return "ledger empty up to the snapshot: nothing to compare"
            shown = "; ".join(found[:20]) + (f"; ... {len(found) - 20} more" if len(found) > 20 else "")
            raise StepFailed(
                f"the ledger differs from the snapshot in {len(found)} place(s): {shown}",
                state="nothing was changed",
            )
        count = len(info.data["totals"])
        return f"the ledger up to event {info.last_event_id} matches the snapshot's {count} totals"

    def spend_totals(step: StepContext) -> str:
        from caracald.store import spend_totals as totals_store

        with env.db().transaction() as conn:
            written = totals_store.rebuild(conn)
        return (
            f"spend_totals rebuilt from the ledger: {written.hours:,} hourly rows, "
            f"{written.days:,} daily rows"
        )

    def counters(step: StepContext) -> str:
        from caracald.admin import budget as budget_admin
        from caracald.budget.redis_backend import RedisBudget

        db = env.db()
        scopes = budget_admin.all_scopes(db)
        totals = budget_admin.ledger_totals(db, scopes, utcnow())

        async def apply() -> None:
            budget = RedisBudget.from_url(env.redis_url())
            try:
                await budget.rebuild(totals)
            finally:
                await budget.close()

        asyncio.run(apply())
        return f"rebuilt {len(totals)} Redis counters of {len(scopes)} policies from the ledger"

    plan.add("verify", "Verify the snapshot's SHA-256", verify)
    if put_back:
        plan.add(
            "reference",
            "Put back the snapshot's agents, credentials, policies, allowlists, prices and signing keys "
            f"({sum(held.values())} rows)",
            reference_step,
            destructive=True,
        )
    plan.add(
        "compare",
        f"Compare the ledger up to event {info.last_event_id} with the snapshot's totals",
        compare_step,
    )
    plan.add(
        "spend-totals",
        "Rebuild the hourly and daily spend totals from the ledger",
        spend_totals,
        destructive=True,
    )
    if redis:
        plan.add(
            "budget-counters",
            "Rebuild the Redis budget counters of every active policy from the ledger",
            counters,
            destructive=True,
        )
    else:
        plan.note(
            "budget.backend is local: each gateway rebuilds its counters from the ledger when it starts"
        )
    return plan
